/* The client for this origin's HTTP API: the access token (kept in this tab's sessionStorage and
 * sent as `Authorization: Bearer`), JSON calls, the streamed chat request, the health probe, and
 * failed answers turned into plain words for the error banner. */

import { els } from './dom.js';

const TOKEN_KEY = 'qwen-box.access-token';
const TOKEN_DEBOUNCE_MS = 600;
const HEALTH_TIMEOUT_MS = 8000;

/* The server may require `Authorization: Bearer TOKEN` on /api/* (ACCESS_TOKEN). The token
   lives in sessionStorage: it survives a reload of this tab, not the browser session. */
export function loadAccessToken() {
  try {
    els.accessToken.value = sessionStorage.getItem(TOKEN_KEY) || '';
  } catch (_) {
    // storage unavailable (privacy mode): the field still works for this page
  }
}

function saveAccessToken() {
  try {
    const token = els.accessToken.value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch (_) {
    // ignore, see loadAccessToken
  }
}

/** Keep the token field saved; `onChanged` runs once typing pauses (a new token may open what
 *  the server refused before). */
export function watchAccessToken(onChanged) {
  let timer = 0;
  els.accessToken.addEventListener('input', () => {
    saveAccessToken();
    clearTimeout(timer);
    timer = setTimeout(onChanged, TOKEN_DEBOUNCE_MS);
  });
}

function authHeaders(headers) {
  const token = els.accessToken.value.trim();
  if (token) headers.Authorization = `Bearer ${token}`;
  return headers;
}

/** fetch() a JSON route of this service. Resolves {ok, status, data, response}; throws on network failure. */
export async function api(method, path, body, signal) {
  const headers = authHeaders({ Accept: 'application/json' });
  const init = { method, headers, cache: 'no-store', signal };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = response.status === 204 ? null : await response.json().catch(() => null);
  return { ok: response.ok, status: response.status, data, response };
}

/** GET a binary route of this service (a stored image) with the access token; resolves a Blob, or
 *  null when the server refuses. */
export async function fetchBlob(path) {
  const response = await fetch(path, { headers: authHeaders({}), cache: 'force-cache' });
  return response.ok ? response.blob() : null;
}

/** POST /api/chat asking for a text/event-stream reply; resolves the raw Response. */
export function streamChat(payload, signal) {
  return fetch('/api/chat', {
    method: 'POST',
    headers: authHeaders({ 'Content-Type': 'application/json', Accept: 'text/event-stream' }),
    body: JSON.stringify(payload),
    cache: 'no-store',
    signal,
  });
}

/** GET /api/health (open to all, so no token). Resolves {ok, status, body}; throws on network
 *  failure or after HEALTH_TIMEOUT_MS (a TimeoutError). */
export async function getHealth() {
  const res = await fetch('/api/health', {
    cache: 'no-store',
    headers: { Accept: 'application/json' },
    signal: timeoutSignal(HEALTH_TIMEOUT_MS),
  });
  const body = await res.json().catch(() => ({}));
  return { ok: res.ok, status: res.status, body };
}

function timeoutSignal(ms) {
  if (AbortSignal.timeout) return AbortSignal.timeout(ms);
  const controller = new AbortController();
  setTimeout(() => controller.abort(), ms);
  return controller.signal;
}

function failureMessage(status, statusText, body, retryAfter) {
  if (status === 401) {
    return 'This server needs an access token. Enter it under Settings, then send again.';
  }
  let message = body?.error?.message || body?.detail || '';
  if (typeof message !== 'string') message = '';
  if (!message) message = `The server answered ${status} ${statusText || ''}`.trim() + '.';
  if (status === 429 && !/too many|rate/i.test(message)) message = `Too many requests (limit: ${message}).`;
  message = inPageTerms(status, body, message);
  // Only a busy or rate-limited server means "wait and retry"; other answers carry the header too.
  const waitable = status === 429 || status === 503;
  if (waitable && retryAfter && /^\d+$/.test(retryAfter.trim()) && !/retry/i.test(message)) {
    message = `${message.replace(/\s+$/, '')}${/[.!?]$/.test(message.trim()) ? '' : '.'} Retry in ${retryAfter.trim()} s.`;
  }
  return message;
}

/** The server names request fields (`max_tokens`); the page's user knows the Settings labels. */
function inPageTerms(status, body, message) {
  const kind = body?.error?.type || body?.error?.code;
  const fit = /needs (\d+) tokens,? but only (\d+) (?:tokens )?fit: the context holds (\d+) tokens and (\d+) are kept/
    .exec(message);
  if (kind === 'context_length_exceeded' || (status === 413 && fit)) {
    if (fit) {
      return `Your message doesn’t fit: it needs ${fit[1]} tokens, and the model’s context of ${fit[3]} `
        + `tokens keeps ${fit[4]} for the reply (the “Max tokens” setting). Shorten the message or the `
        + 'system prompt, or lower “Max tokens” in Settings.';
    }
    return message.replace(/\bmax_tokens\b/g, '“Max tokens” (Settings)');
  }
  const cap = /^max_tokens: must be at most (\d+)/.exec(message);
  if (cap) return `“Max tokens” in Settings can be at most ${cap[1]} on this server.`;
  return message.replace(/\bmax_tokens\b/g, '“Max tokens”');
}

/** The plain-words reason for a failed api() result. */
export function apiFailure(result) {
  return failureMessage(result.status, result.response.statusText, result.data,
    result.response.headers.get('Retry-After'));
}

/** The plain-words reason for a failed fetch() Response (its body is read). */
export async function errorMessageFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    // not JSON
  }
  return failureMessage(response.status, response.statusText, body, response.headers.get('Retry-After'));
}
