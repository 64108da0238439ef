/* The model's health: polls GET /api/health (faster while loading), shows it in the status line
 * and the notice above the composer, and tells the sidebar whether the server keeps history
 * (which starts it). Owns the health state; others ask isReady(). */

import { els } from './dom.js';
import { getHealth } from './api.js';
import { isStreaming, updateControls } from './chat.js';
import { modelsAfterOutage, shortModelName } from './models.js';
import { capMaxTokens } from './settings.js';
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
  els.status.title = next === 'error' ? 'See the message above the message box' : (detail || text);
  updateNotice(detail);
  updateControls();
}

function updateNotice(detail) {
  const messages = {
    loading: `Loading model…${loadingFor()} This can take a minute after the server starts; you can type your message meanwhile.`,
    offline: 'Can’t reach the server. Retrying…',
    error: explainLoadFailure(detail),
  };
  const text = messages[health] || '';
  els.notice.hidden = !text;
  els.notice.dataset.state = health;
  if (els.noticeText.textContent !== text) els.noticeText.textContent = text;
  // The raw error is for whoever runs the server: behind a Details toggle, never in the top bar.
  const raw = health === 'error' && detail ? String(detail) : '';
  els.noticeDetails.hidden = !raw;
  if (els.noticeRaw.textContent !== raw) els.noticeRaw.textContent = raw;
}

let loadingSince = 0; // when this page first saw the model loading

/** " (12 s so far)" once the load has taken a while: the notice visibly moves while it waits. */
function loadingFor() {
  if (health !== 'loading') {
    loadingSince = 0;
    return '';
  }
  if (!loadingSince) loadingSince = Date.now();
  const seconds = Math.round((Date.now() - loadingSince) / 1000);
  return seconds >= 2 ? ` (${seconds} s so far)` : '';
}

/** Why a model failed to load, in a sentence that says what to do (the raw error goes in Details). */
export function explainLoadFailure(detail) {
  const d = String(detail || '');
  if (/couldn'?t connect|could not connect|connection ?error|name resolution|network is unreachable|max retries|offline mode|HF_HUB_OFFLINE|LocalEntryNotFound|couldn'?t find them in the cached files/i.test(d)) {
    return 'The model cannot be downloaded: this machine has no access to the model hub. Give a local folder that holds the model (MODEL_ID=/path/to/folder) and restart the server.';
  }
  if (/out of memory|MemoryError|cannot allocate memory|memory budget/i.test(d)) {
    return 'The model does not fit in this machine’s memory. Choose a smaller model or a lower precision (DTYPE), then restart the server.';
  }
  if (/gated repo|401 Client Error|403 Client Error|access to model .* is restricted/i.test(d)) {
    return 'The model hub refused to hand out this model (it may need its licence accepted and a token). Give a local folder instead.';
  }
  if (/no such file|does not appear to have a file|not a valid model identifier|is not a local folder|repo id must|incorrect path/i.test(d)) {
    return 'The model was not found: MODEL_ID must name a folder holding a model (config.json and weights) or a model hub id.';
  }
  return 'The model failed to load. The details below say why; fix it and restart the server.';
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
      if (typeof body.context_length === 'number') capMaxTokens(body.context_length);
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
      setHealth('error', 'Model failed to load', detail);
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
