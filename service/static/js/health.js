/* The model's health: polls GET /api/health (faster while loading), shows it in the status line
 * and the notice above the composer, and tells the sidebar whether the server keeps history
 * (which starts it). Owns the health state; others ask isReady(). */

import { els } from './dom.js';
import { getHealth } from './api.js';
import { isStreaming, updateControls } from './chat.js';
import { modelsAfterOutage, shortModelName } from './models.js';
import { historyAfterOutage, historyFromHealth, startHistory } from './sidebar.js';

const HEALTH_POLL_LOADING_MS = 2000;
const HEALTH_POLL_READY_MS = 15000;
const HEALTH_POLL_ERROR_MS = 5000;

let health = 'loading';   // loading | ready | error | offline
let healthTimer = 0;
let healthInFlight = false;
let healthModel = 'model'; // health's name for the model that answers

/** The model answers: messages can be sent. */
export function isReady() {
  return health === 'ready';
}

function setHealth(next, text, detail) {
  health = next;
  els.status.dataset.state = next;
  // Only touch the text when it changes: the element is a live region.
  if (els.status.textContent !== text) els.status.textContent = text;
  els.status.title = detail || text;
  updateNotice(detail);
  updateControls();
}

function updateNotice(detail) {
  const messages = {
    loading: 'The model is loading. This can take a minute after the server starts; you can type your message meanwhile.',
    offline: 'Can’t reach the server. Retrying…',
    error: `The model failed to load: ${detail || 'unknown error'}`,
  };
  const text = messages[health] || '';
  els.notice.hidden = !text;
  els.notice.dataset.state = health;
  if (els.noticeText.textContent !== text) els.noticeText.textContent = text;
}

/** Ask /api/health now, then again after a delay that depends on the answer. */
export async function pollHealth() {
  if (healthInFlight) return;
  healthInFlight = true;
  clearTimeout(healthTimer);
  let next = HEALTH_POLL_LOADING_MS;
  const before = health;
  try {
    const { ok, status, body } = await getHealth();
    if (ok && body.status === 'ok') {
      healthModel = body.model || 'model';
      setHealth('ready', readyText());
      showModelName(body.model);
      if (typeof body.history === 'boolean') historyFromHealth(body.history);
      else startHistory(); // an older server that does not say
      next = HEALTH_POLL_READY_MS;
    } else if (body.status === 'loading') {
      setHealth('loading', 'Loading model…');
      showModelName(body.model);
      startHistory();
    } else if (body.status === 'error') {
      const detail = String(body.detail || body.error?.message || 'The model failed to load.');
      setHealth('error', `Error: ${detail}`, detail);
      next = HEALTH_POLL_ERROR_MS;
      startHistory(); // past chats can still be read
    } else if ([502, 503, 504].includes(status)) {
      // A proxy answering for a backend that is down.
      setHealth('offline', 'Server unreachable');
    } else {
      const detail = `Health check failed (HTTP ${status}).`;
      setHealth('error', `Error: ${detail}`, detail);
      next = HEALTH_POLL_ERROR_MS;
    }
  } catch (err) {
    // A slow answer while this page is streaming a reply is not an outage: keep the last state.
    const slowWhileBusy = err && err.name === 'TimeoutError' && isStreaming();
    if (!slowWhileBusy) setHealth('offline', 'Server unreachable');
  } finally {
    healthInFlight = false;
    healthTimer = setTimeout(pollHealth, next);
  }
  if (before === 'offline' && health !== 'offline') reconnected();
}

/** "Ready · MODEL", or just "Ready" when the model dropdown already names the model. */
function readyText() {
  return els.modelPicker.hidden ? `Ready · ${healthModel}` : 'Ready';
}

/** The model dropdown appeared or went: the status line names the model only without it. */
export function refreshReadyText() {
  if (health === 'ready') setHealth('ready', readyText());
}

function showModelName(model) {
  const name = shortModelName(model);
  if (name && els.welcomeModel.textContent !== name) els.welcomeModel.textContent = name;
}

/** The server came back after being unreachable: load what could not be loaded meanwhile. */
function reconnected() {
  historyAfterOutage();
  modelsAfterOutage();
}
