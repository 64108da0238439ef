/* The model menu: GET /api/models (polled while a model loads), the dropdown with each model's
 * state, the progress or failure line beside it, and switching with POST /api/models/active.
 * Hidden on servers with one model or without the API. Owns the menu's state. */

import { els } from './dom.js';
import { api, apiFailure } from './api.js';
import { explainLoadFailure, pollHealth, refreshReadyText } from './health.js';
import { askForAccessToken } from './settings.js';

const MODELS_POLL_MS = 2000;
const MODELS_RETRY_MS = 15000;

const models = {
  supported: null,        // null = not asked yet, false = this server has no /api/models
  list: [],
  active: null,
  pending: null,          // the model the user chose, until it is loaded or has failed
  message: '',            // a refusal from POST /api/models/active
  failed: null,           // the model last chosen here, if it failed to load
  busy: false,
  timer: 0,
  loadingSince: new Map(),
};

/** "Qwen/Qwen2.5-1.5B-Instruct" or "/models/Qwen2.5-1.5B-Instruct" -> "Qwen2.5-1.5B-Instruct". */
export function shortModelName(id) {
  return String(id || '').split(/[\\/]/).filter(Boolean).pop() || String(id || '');
}

/** The server is back: ask for the menu if it was never answered. */
export function modelsAfterOutage() {
  if (models.supported === null) loadModels();
}

/** A new access token: ask again, unless this server has no menu. */
export function modelsAfterToken() {
  if (models.supported !== false) loadModels();
}

const MODEL_STATES = { loaded: 'loaded', loading: 'loading…', failed: 'failed', available: 'available' };

/** GET /api/models; while a model is loading, again every 2 s. A server without it: no dropdown. */
export async function loadModels() {
  clearTimeout(models.timer);
  let result = null;
  try {
    result = await api('GET', '/api/models');
  } catch (_) {
    result = null;
  }
  if (!result) {
    models.timer = setTimeout(loadModels, MODELS_RETRY_MS);
    return;
  }
  if (result.status === 404 || result.status === 405) {
    models.supported = false; // an older server: the model is whatever it runs
    renderModels();
    return;
  }
  if (!result.ok || !Array.isArray(result.data?.data)) {
    // 401 waits for the token (see onTokenChanged); anything else is retried later.
    if (result.status !== 401) models.timer = setTimeout(loadModels, MODELS_RETRY_MS);
    return;
  }
  const previousActive = models.active;
  const wasLoading = models.list.some((m) => m.state === 'loading');
  models.supported = true;
  models.list = result.data.data.filter((m) => m && typeof m.id === 'string');
  models.active = typeof result.data.active === 'string' ? result.data.active : null;
  const loading = models.list.some((m) => m.state === 'loading');
  const now = Date.now();
  for (const m of models.list) {
    if (m.state === 'loading' && !models.loadingSince.has(m.id)) models.loadingSince.set(m.id, now);
    if (m.state !== 'loading') models.loadingSince.delete(m.id);
  }
  // The model being switched to: the one chosen here, or one the server says is pending
  // (chosen in another tab). It shows as chosen until it is loaded (and active) or has failed.
  const pending = models.list.find((m) => m.id === models.pending);
  if (pending?.state === 'failed') {
    models.failed = pending.id;
    models.pending = null;
  } else if (!pending || pending.state === 'loaded' || pending.state === 'available') {
    models.pending = null;
  }
  const serverPending = models.list.find((m) => m.pending === true && m.state === 'loading');
  if (serverPending && !models.pending) models.pending = serverPending.id;
  renderModels();
  document.dispatchEvent(
    new CustomEvent('models-changed', {
      detail: { list: models.list, active: models.active, limits: result.data.image_limits },
    }),
  );
  if (loading || models.pending) models.timer = setTimeout(loadModels, MODELS_POLL_MS);
  // The active model changed or finished loading: the status line and welcome text follow health.
  if ((previousActive && previousActive !== models.active) || (wasLoading && !loading)) pollHealth();
}

function renderModels() {
  const show = models.supported === true && models.list.length > 1;
  els.modelPicker.hidden = !show;
  refreshReadyText();
  if (!show) return;

  const select = els.modelSelect;
  const options = models.list.map((m) => {
    const option = document.createElement('option');
    option.value = m.id;
    option.textContent = `${m.id} · ${MODEL_STATES[m.state] || m.state || 'unknown'}`;
    option.title = modelDetails(m);
    option.dataset.state = m.state || '';
    return option;
  });
  const chosen = models.pending || models.active;
  // Rebuilding an open dropdown would close it under the user's pointer: only change what differs.
  const same = select.options.length === options.length
    && options.every((o, i) => select.options[i].value === o.value);
  if (same) {
    options.forEach((o, i) => {
      const current = select.options[i];
      if (current.textContent !== o.textContent) current.textContent = o.textContent;
      current.title = o.title;
      current.dataset.state = o.dataset.state;
    });
  } else {
    select.replaceChildren(...options);
  }
  if (chosen && select.value !== chosen) select.value = chosen;
  select.disabled = models.busy;
  const current = models.list.find((m) => m.id === select.value);
  select.title = current ? modelDetails(current) : '';

  // Next to the dropdown: progress of a load, a failure, or a refusal.
  let text = '';
  let kind = '';
  let title = '';
  const loadingModel = models.list.find((m) => m.id === models.pending && m.state === 'loading')
    || models.list.find((m) => m.state === 'loading');
  const failed = models.list.find((m) => m.id === models.failed && m.state === 'failed')
    || models.list.find((m) => m.id === select.value && m.state === 'failed');
  if (models.message) {
    text = models.message;
    kind = 'error';
  } else if (loadingModel) {
    const since = models.loadingSince.get(loadingModel.id);
    const seconds = since ? Math.round((Date.now() - since) / 1000) : 0;
    const named = loadingModel.id === select.value ? '' : ` ${shortModelName(loadingModel.id)}`;
    text = `Loading${named}…${seconds >= 2 ? ` ${seconds} s` : ''}`;
    kind = 'loading';
  } else if (failed) {
    // A sentence, not the raw OSError: that one is in the hover text and the dropdown's details.
    text = `${shortModelName(failed.id)} failed to load`;
    title = `${explainLoadFailure(failed.error)}${failed.error ? `\n\n${failed.error}` : ''}`;
    kind = 'error';
  }
  els.modelState.hidden = !text;
  els.modelState.dataset.state = kind;
  els.modelState.title = title || text;
  if (els.modelStateText.textContent !== text) els.modelStateText.textContent = text;
}

function modelDetails(m) {
  const parts = [m.id];
  if (typeof m.params_b === 'number') parts.push(`${m.params_b}B parameters`);
  if (typeof m.context_length === 'number') parts.push(`context ${m.context_length} tokens`);
  if (m.licence) parts.push(`licence: ${m.licence}`);
  if (m.source && m.source !== m.id) parts.push(`from ${m.source}`);
  if (m.state === 'failed' && m.error) parts.push(`failed: ${m.error}`);
  return parts.join(' · ');
}

/** The user picked a model in the dropdown: ask the server to switch to it. */
export async function chooseModel() {
  const id = els.modelSelect.value;
  models.message = '';
  models.failed = null;
  if (id === (models.pending || models.active)) {
    renderModels();
    return;
  }
  models.busy = true;
  renderModels();
  let result = null;
  try {
    result = await api('POST', '/api/models/active', { model: id });
  } catch (_) {
    result = null;
  }
  models.busy = false;
  if (result?.ok) {
    models.pending = id;
    models.message = '';
    if (result.status === 200) models.active = id; // already loaded: switched at once
  } else {
    models.message = result ? apiFailure(result) : 'Couldn’t switch the model: the server is unreachable.';
    if (result?.status === 401) askForAccessToken();
  }
  renderModels();
  loadModels();
  pollHealth();
}
