/* qwen-box chat page.
 *
 * Plain browser JS, no build step. Talks only to this origin:
 *   GET  /api/health                 model state (and whether history is on), polled
 *   POST /api/chat                   {"messages": [...], "stream": true, ...} -> text/event-stream
 *   /api/conversations[/ID]          the sidebar: list, search, create, read, rename, delete
 *   GET  /api/models, POST /api/models/active   the model dropdown (hidden on servers without it)
 *
 * A chat is either stored (the server keeps it: the page sends only the new user turn plus
 * `conversation_id`, and the server adds the stored turns as context) or private (nothing is
 * stored: the page sends the whole conversation, as it always did).
 *
 * CSP-ready: no inline scripts or handlers, and no element.style writes
 * (visibility is toggled with the `hidden` attribute, looks with classes).
 * Model output is untrusted: it is rendered with marked, raw HTML is escaped,
 * and the result is sanitised with DOMPurify before it touches the DOM.
 * Conversation titles are user/model text too: they only ever go through textContent.
 */
'use strict';

(() => {
  const HEALTH_POLL_LOADING_MS = 2000;
  const HEALTH_POLL_READY_MS = 15000;
  const HEALTH_POLL_ERROR_MS = 5000;
  const HEALTH_TIMEOUT_MS = 8000;
  const STICK_TO_BOTTOM_PX = 48;
  const SAFE_LINK = /^(https?:|mailto:)/i;
  const TOKEN_KEY = 'qwen-box.access-token';
  const CONVERSATION_KEY = 'qwen-box.conversation';
  const PAGE_SIZE = 30;
  const SEARCH_DEBOUNCE_MS = 250;
  const TOKEN_DEBOUNCE_MS = 600;
  const MODELS_POLL_MS = 2000;
  const MODELS_RETRY_MS = 15000;
  const TITLE_MAX = 200;

  const $ = (id) => document.getElementById(id);

  const els = {
    app: $('app'),
    sidebar: $('sidebar'),
    sidebarToggle: $('sidebar-toggle'),
    sidebarClose: $('sidebar-close'),
    backdrop: $('backdrop'),
    search: $('search'),
    searchBox: $('search-box'),
    historyOffNote: $('history-off-note'),
    sidebarMessage: $('sidebar-message'),
    sidebarMessageText: $('sidebar-message-text'),
    sidebarRetry: $('sidebar-retry'),
    list: $('conversation-list'),
    loadMore: $('load-more'),
    status: $('status'),
    modelPicker: $('model-picker'),
    modelSelect: $('model-select'),
    modelState: $('model-state'),
    modelStateText: $('model-state-text'),
    settingsToggle: $('settings-toggle'),
    settings: $('settings'),
    systemPrompt: $('system-prompt'),
    maxTokens: $('max-tokens'),
    temperature: $('temperature'),
    accessToken: $('access-token'),
    newChat: $('new-chat'),
    newChatCompact: $('new-chat-compact'),
    scroller: $('scroller'),
    welcome: $('welcome'),
    welcomeModel: $('welcome-model'),
    messages: $('messages'),
    jump: $('jump'),
    notice: $('notice'),
    noticeText: $('notice-text'),
    error: $('error'),
    errorText: $('error-text'),
    errorClose: $('error-close'),
    composerArea: document.querySelector('.composer-area'),
    composer: $('composer'),
    growWrap: $('grow-wrap'),
    input: $('input'),
    send: $('send'),
    stop: $('stop'),
    privateToggle: $('private-toggle'),
    privateHint: $('private-hint'),
  };

  const state = {
    health: 'loading',        // loading | ready | error | offline
    healthTimer: 0,
    healthInFlight: false,
    healthModel: 'model',     // health's name for the model that answers
    history: [],              // finished turns of the chat on screen: {role, content}
    active: null,             // the reply currently streaming: {controller, reply}
    epoch: 0,                 // bumped whenever the chat on screen changes, so late callbacks are ignored
    stickToBottom: true,
    conversationId: null,     // the stored conversation on screen; null = a new (or private) chat
    private: false,           // this chat is not stored (sticky across "New chat")
    opening: false,           // a stored conversation is being fetched
    pendingRestore: null,     // id to reopen once the access token is known
    historyStarted: false,    // the sidebar has been loaded once
    historyMode: 'unknown',   // unknown | on | off (server keeps nothing) | auth (needs token) | error
    side: {
      items: [],              // conversations shown, newest first
      next: null,             // cursor for "Load more"
      pages: 0,
      query: '',
      seq: 0,                 // newest list request; older answers are dropped
      loading: false,
      editingId: null,        // an item being renamed: the list is not rebuilt under it
      dirty: false,
      searchTimer: 0,
    },
    nodes: new Map(),         // conversation id -> its <li>
    models: {
      supported: null,        // null = not asked yet, false = this server has no /api/models
      list: [],
      active: null,
      pending: null,          // the model the user chose, until it is loaded or has failed
      message: '',            // a refusal from POST /api/models/active
      failed: null,           // the model last chosen here, if it failed to load
      busy: false,
      timer: 0,
      loadingSince: new Map(),
    },
    tokenTimer: 0,
  };

  /* ------------------------------------------------------------------ */
  /* Markdown rendering (untrusted model output)                         */
  /* ------------------------------------------------------------------ */

  function escapeHtml(text) {
    return String(text)
      .replace(/&/g, '&amp;')
      .replace(/</g, '&lt;')
      .replace(/>/g, '&gt;')
      .replace(/"/g, '&quot;')
      .replace(/'/g, '&#39;');
  }

  const markdown = (typeof marked !== 'undefined' && marked.Marked)
    ? new marked.Marked({
      gfm: true,
      breaks: true,
      renderer: {
        // Raw HTML written by the model is shown as literal text, never parsed.
        html({ text, block }) {
          const escaped = escapeHtml(text);
          return block ? `<p class="raw-html">${escaped}</p>\n` : escaped;
        },
        // No remote images: they would be a network fetch to a third party.
        // Show the image as a plain link instead (the link is sanitised below).
        image({ href, text }) {
          const label = text || href || 'image';
          return `<a href="${escapeHtml(href || '')}">${escapeHtml(label)}</a>`;
        },
        // Task-list checkboxes as characters, so no <input> is ever produced.
        checkbox({ checked }) {
          return checked ? '☑ ' : '☐ ';
        },
      },
    })
    : null;

  const purifyReady = typeof DOMPurify !== 'undefined' && DOMPurify.isSupported;

  const PURIFY_CONFIG = {
    USE_PROFILES: { html: true },
    FORBID_TAGS: ['style', 'form', 'input', 'button', 'textarea', 'select', 'option',
      'img', 'picture', 'video', 'audio', 'source', 'iframe', 'object', 'embed', 'link', 'meta', 'base'],
    FORBID_ATTR: ['style', 'srcset', 'action', 'formaction'],
    ALLOW_DATA_ATTR: false,
  };

  if (purifyReady) {
    // Links: only http(s) and mailto survive, and they open in a new tab without an opener.
    DOMPurify.addHook('afterSanitizeAttributes', (node) => {
      if (node.nodeName !== 'A') return;
      const href = (node.getAttribute('href') || '').trim();
      if (href && SAFE_LINK.test(href)) {
        node.setAttribute('target', '_blank');
        node.setAttribute('rel', 'noopener noreferrer');
      } else {
        node.removeAttribute('href');
        node.removeAttribute('target');
      }
    });
  }

  /** Render `text` as sanitised Markdown into `target` (plain text if a library is missing). */
  function renderMarkdown(target, text) {
    if (!markdown || !purifyReady) {
      target.textContent = text;
      return;
    }
    const html = markdown.parse(text);
    target.innerHTML = DOMPurify.sanitize(html, PURIFY_CONFIG);
    decorateCodeBlocks(target);
  }

  /** Wrap each <pre> in a box with a language label and a Copy button (DOM only, no HTML strings). */
  function decorateCodeBlocks(root) {
    for (const pre of root.querySelectorAll('pre')) {
      const code = pre.querySelector('code');
      const wrap = document.createElement('div');
      wrap.className = 'code-block';

      const bar = document.createElement('div');
      bar.className = 'code-bar';
      const lang = document.createElement('span');
      lang.className = 'code-lang';
      lang.textContent = languageOf(code) || 'code';
      const copy = document.createElement('button');
      copy.type = 'button';
      copy.className = 'copy-btn';
      copy.textContent = 'Copy';
      copy.setAttribute('aria-label', 'Copy code');
      bar.append(lang, copy);

      pre.replaceWith(wrap);
      wrap.append(bar, pre);
    }
  }

  function languageOf(code) {
    if (!code) return '';
    for (const cls of code.classList) {
      if (cls.startsWith('language-')) return cls.slice('language-'.length);
    }
    return '';
  }

  async function copyCode(button) {
    const pre = button.closest('.code-block')?.querySelector('pre');
    if (!pre) return;
    const text = pre.textContent;
    let ok = false;
    try {
      if (navigator.clipboard && window.isSecureContext) {
        await navigator.clipboard.writeText(text);
        ok = true;
      }
    } catch (_) {
      ok = false;
    }
    if (!ok) {
      // No clipboard API (e.g. plain http on a LAN address): select the code so Ctrl+C works.
      const range = document.createRange();
      range.selectNodeContents(pre);
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      return;
    }
    button.textContent = 'Copied';
    setTimeout(() => { button.textContent = 'Copy'; }, 1500);
  }


  /* ------------------------------------------------------------------ */
  /* Health                                                              */
  /* ------------------------------------------------------------------ */

  function setHealth(health, text, detail) {
    state.health = health;
    els.status.dataset.state = health;
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
    const text = messages[state.health] || '';
    els.notice.hidden = !text;
    els.notice.dataset.state = state.health;
    if (els.noticeText.textContent !== text) els.noticeText.textContent = text;
  }

  async function pollHealth() {
    if (state.healthInFlight) return;
    state.healthInFlight = true;
    clearTimeout(state.healthTimer);
    let next = HEALTH_POLL_LOADING_MS;
    const before = state.health;
    try {
      const res = await fetch('/api/health', {
        cache: 'no-store',
        headers: { Accept: 'application/json' },
        signal: timeoutSignal(HEALTH_TIMEOUT_MS),
      });
      const body = await res.json().catch(() => ({}));
      if (res.ok && body.status === 'ok') {
        state.healthModel = body.model || 'model';
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
      } else if ([502, 503, 504].includes(res.status)) {
        // A proxy answering for a backend that is down.
        setHealth('offline', 'Server unreachable');
      } else {
        const detail = `Health check failed (HTTP ${res.status}).`;
        setHealth('error', `Error: ${detail}`, detail);
        next = HEALTH_POLL_ERROR_MS;
      }
    } catch (err) {
      // A slow answer while this page is streaming a reply is not an outage: keep the last state.
      const slowWhileBusy = err && err.name === 'TimeoutError' && state.active;
      if (!slowWhileBusy) setHealth('offline', 'Server unreachable');
    } finally {
      state.healthInFlight = false;
      state.healthTimer = setTimeout(pollHealth, next);
    }
    if (before === 'offline' && state.health !== 'offline') reconnected();
  }

  /** "Ready · MODEL", or just "Ready" when the model dropdown already names the model. */
  function readyText() {
    return els.modelPicker.hidden ? `Ready · ${state.healthModel}` : 'Ready';
  }

  function timeoutSignal(ms) {
    if (AbortSignal.timeout) return AbortSignal.timeout(ms);
    const controller = new AbortController();
    setTimeout(() => controller.abort(), ms);
    return controller.signal;
  }

  /** "Qwen/Qwen2.5-1.5B-Instruct" or "/models/Qwen2.5-1.5B-Instruct" -> "Qwen2.5-1.5B-Instruct". */
  function shortModelName(id) {
    return String(id || '').split(/[\\/]/).filter(Boolean).pop() || String(id || '');
  }

  function showModelName(model) {
    const name = shortModelName(model);
    if (name && els.welcomeModel.textContent !== name) els.welcomeModel.textContent = name;
  }

  /** The server came back after being unreachable: load what could not be loaded meanwhile. */
  function reconnected() {
    if (state.historyStarted && (state.historyMode === 'error' || state.historyMode === 'unknown')) loadList();
    if (state.models.supported === null) loadModels();
  }

  /* ------------------------------------------------------------------ */
  /* Controls, banners, scrolling                                        */
  /* ------------------------------------------------------------------ */

  function chatIsEmpty() {
    return els.messages.childElementCount === 0 && !state.opening;
  }

  function updateControls() {
    const streaming = Boolean(state.active);
    els.send.hidden = streaming;
    els.stop.hidden = !streaming;
    els.send.disabled = state.health !== 'ready' || state.opening;
    els.send.title = state.health === 'ready' ? 'Send (Enter)' : 'The model is not ready yet';
    updatePrivacy();
  }

  /** The Private switch: forced on when the server keeps nothing; fixed once a chat has started. */
  function updatePrivacy() {
    const off = state.historyMode === 'off';
    const isPrivate = off || state.private;
    const locked = off || !chatIsEmpty() || Boolean(state.active);
    els.privateToggle.checked = isPrivate;
    els.privateToggle.disabled = locked;
    els.composerArea.dataset.private = String(isPrivate);
    let hint = '';
    let title = 'Private: this chat is not stored on the server';
    if (off) {
      hint = 'History is off on this server: nothing is stored';
      title = hint;
    } else if (isPrivate) {
      hint = 'This chat is not saved';
    }
    if (!off && locked && !state.active) title = 'Applies to a whole chat: start a new chat to change it';
    els.privateHint.textContent = hint;
    els.privateHint.hidden = !hint;
    els.privateToggle.parentElement.title = title;
  }

  function showError(message) {
    els.errorText.textContent = message;
    els.error.hidden = false;
  }

  function hideError() {
    els.error.hidden = true;
    els.errorText.textContent = '';
  }

  function updateEmptyState() {
    els.welcome.hidden = els.messages.childElementCount > 0 || state.opening;
    els.messages.setAttribute('aria-busy', String(state.opening));
  }

  function distanceFromBottom() {
    const s = els.scroller;
    return s.scrollHeight - s.scrollTop - s.clientHeight;
  }

  function scrollToBottom() {
    els.scroller.scrollTop = els.scroller.scrollHeight;
    state.stickToBottom = true;
    els.jump.hidden = true;
  }

  function followOutput() {
    if (state.stickToBottom) scrollToBottom();
    else els.jump.hidden = false;
  }

  function onScroll() {
    state.stickToBottom = distanceFromBottom() < STICK_TO_BOTTOM_PX;
    if (state.stickToBottom) els.jump.hidden = true;
  }

  /* ------------------------------------------------------------------ */
  /* Input                                                               */
  /* ------------------------------------------------------------------ */

  function setInput(text) {
    els.input.value = text;
    syncInputHeight();
  }

  // The grow-wrap's ::after mirrors the text, which sizes the textarea (see style.css).
  function syncInputHeight() {
    els.growWrap.dataset.replicatedValue = els.input.value;
  }

  function restoreInput(text) {
    const current = els.input.value;
    setInput(current.trim() ? `${text}\n${current}` : text);
    els.input.focus();
  }

  /** Read the settings panel; returns {options} or {error}. */
  function readSettings() {
    const options = {};
    const maxRaw = els.maxTokens.value.trim();
    if (maxRaw !== '') {
      const max = Number(maxRaw);
      if (!Number.isInteger(max) || max < 1) {
        return { error: 'Max tokens must be a whole number of at least 1 (see Settings).' };
      }
      options.max_tokens = max;
    }
    const tempRaw = els.temperature.value.trim();
    if (tempRaw !== '') {
      const temp = Number(tempRaw);
      if (!Number.isFinite(temp) || temp < 0) {
        return { error: 'Temperature must be a number of 0 or more, or blank (see Settings).' };
      }
      options.temperature = temp;
    }
    return { options };
  }

  /* The server may require `Authorization: Bearer TOKEN` on /api/* (ACCESS_TOKEN). The token
     lives in sessionStorage: it survives a reload of this tab, not the browser session. */
  function loadAccessToken() {
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
    // A new token may open the conversations and models the server refused before.
    clearTimeout(state.tokenTimer);
    state.tokenTimer = setTimeout(onTokenChanged, TOKEN_DEBOUNCE_MS);
  }

  function onTokenChanged() {
    if (state.historyStarted && state.historyMode !== 'off') loadList();
    if (state.pendingRestore && !state.conversationId && chatIsEmpty()) {
      openConversation(state.pendingRestore, { restoring: true });
    }
    if (state.models.supported !== false) loadModels();
  }

  function authHeaders(headers) {
    const token = els.accessToken.value.trim();
    if (token) headers.Authorization = `Bearer ${token}`;
    return headers;
  }

  function chatHeaders() {
    return authHeaders({ 'Content-Type': 'application/json', Accept: 'text/event-stream' });
  }

  function askForAccessToken() {
    openSettings();
    els.accessToken.focus();
  }

  /** The chat request: stored chats send only the new turn (the server has the rest). */
  function buildPayload(options, conversationId) {
    const messages = [];
    const system = els.systemPrompt.value.trim();
    if (system) messages.push({ role: 'system', content: system });
    if (conversationId) {
      messages.push(state.history[state.history.length - 1]);
      return { conversation_id: conversationId, messages, stream: true, ...options };
    }
    messages.push(...state.history);
    return { messages, stream: true, ...options };
  }

  /* Which stored conversation is on screen survives a reload (localStorage, this browser only). */
  function remember(id) {
    try {
      if (id) localStorage.setItem(CONVERSATION_KEY, id);
      else localStorage.removeItem(CONVERSATION_KEY);
    } catch (_) {
      // storage unavailable: a reload starts a new chat
    }
  }

  function remembered() {
    try {
      return localStorage.getItem(CONVERSATION_KEY);
    } catch (_) {
      return null;
    }
  }

  /* ------------------------------------------------------------------ */
  /* JSON API calls                                                      */
  /* ------------------------------------------------------------------ */

  /** fetch() a JSON route of this service. Resolves {ok, status, data, response}; throws on network failure. */
  async function api(method, path, body, signal) {
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

  function failureMessage(status, statusText, body, retryAfter) {
    if (status === 401) {
      return 'This server needs an access token. Enter it under Settings, then send again.';
    }
    let message = body?.error?.message || body?.detail || '';
    if (typeof message !== 'string') message = '';
    if (!message) message = `The server answered ${status} ${statusText || ''}`.trim() + '.';
    if (status === 429 && !/too many|rate/i.test(message)) message = `Too many requests (limit: ${message}).`;
    if (retryAfter && /^\d+$/.test(retryAfter.trim()) && !/retry/i.test(message)) {
      message += ` Retry in ${retryAfter.trim()} s.`;
    }
    return message;
  }

  function apiFailure(result) {
    return failureMessage(result.status, result.response.statusText, result.data,
      result.response.headers.get('Retry-After'));
  }

  async function errorMessageFrom(response) {
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      // not JSON
    }
    return failureMessage(response.status, response.statusText, body, response.headers.get('Retry-After'));
  }

  /* ------------------------------------------------------------------ */
  /* Message elements                                                    */
  /* ------------------------------------------------------------------ */

  function appendUserMessage(text) {
    const el = document.createElement('div');
    el.className = 'message';
    el.dataset.testid = 'message';
    el.dataset.role = 'user';
    const body = document.createElement('div');
    body.className = 'message-body';
    body.dataset.testid = 'message-body';
    body.textContent = text; // user text is never HTML
    el.append(body);
    els.messages.append(el);
    updateEmptyState();
    return el;
  }

  function appendAssistantMessage() {
    const el = document.createElement('div');
    el.className = 'message';
    el.dataset.testid = 'message';
    el.dataset.role = 'assistant';
    el.dataset.streaming = 'true';
    el.setAttribute('aria-busy', 'true');

    const body = document.createElement('div');
    body.className = 'message-body markdown';
    body.dataset.testid = 'message-body';
    body.append(typingIndicator());

    const meta = document.createElement('div');
    meta.className = 'message-meta';
    meta.dataset.testid = 'message-meta';

    el.append(body, meta);
    els.messages.append(el);
    updateEmptyState();
    return { el, body, meta, text: '', renderQueued: false, inHistory: false };
  }

  function typingIndicator() {
    const dots = document.createElement('span');
    dots.className = 'typing';
    dots.setAttribute('role', 'img');
    dots.setAttribute('aria-label', 'Generating');
    dots.append(document.createElement('span'), document.createElement('span'), document.createElement('span'));
    return dots;
  }

  function renderReply(reply) {
    if (reply.text) renderMarkdown(reply.body, reply.text);
    followOutput();
  }

  // Re-rendering the whole reply on every token is wasteful; do it at most once per frame.
  function scheduleRender(reply) {
    if (reply.renderQueued) return;
    reply.renderQueued = true;
    requestAnimationFrame(() => {
      reply.renderQueued = false;
      if (reply.el.dataset.streaming === 'true') renderReply(reply);
    });
  }

  function finishReply(reply, finish) {
    renderReply(reply);
    if (!reply.text) reply.body.replaceChildren();
    reply.el.dataset.streaming = 'false';
    reply.el.dataset.finish = finish;
    reply.el.removeAttribute('aria-busy');
  }

  function describeDone(event) {
    const usage = event.usage || {};
    const timing = event.timing || {};
    const parts = [];
    const isNum = (v) => typeof v === 'number' && Number.isFinite(v);
    if (isNum(usage.completion_tokens)) {
      parts.push(`${usage.completion_tokens} token${usage.completion_tokens === 1 ? '' : 's'}`);
    }
    if (isNum(timing.tokens_per_s)) parts.push(`${timing.tokens_per_s.toFixed(1)} tok/s`);
    if (isNum(timing.ttft_s)) parts.push(`first token ${timing.ttft_s.toFixed(2)} s`);
    if (isNum(timing.queued_s) && timing.queued_s >= 0.5) parts.push(`queued ${timing.queued_s.toFixed(1)} s`);
    let text = parts.join(' · ');
    if (event.finish_reason === 'length') text += ' (cut at max tokens)';
    const dropped = event.context?.dropped_messages;
    if (isNum(dropped) && dropped > 0) {
      text += ` (${dropped} oldest message${dropped === 1 ? '' : 's'} left out to fit the context)`;
    }
    return text.trim();
  }

  function markStopped(reply) {
    const badge = document.createElement('span');
    badge.className = 'meta-stopped';
    badge.textContent = 'Stopped';
    reply.meta.replaceChildren(badge);
  }

  /** The error marker under a reply; `retry` adds a Retry button (not on stored, older replies). */
  function showReplyError(reply, message, retry) {
    const box = document.createElement('div');
    box.className = 'reply-error';
    box.dataset.testid = 'reply-error';
    const text = document.createElement('span');
    text.className = 'reply-error-text';
    text.textContent = message;
    box.append(text);
    if (retry) {
      const button = document.createElement('button');
      button.type = 'button';
      button.className = 'btn-small retry-btn';
      button.textContent = 'Retry';
      button.addEventListener('click', retry);
      box.append(button);
    }
    reply.el.insertBefore(box, reply.meta);
  }

  // Retry only makes sense on the latest reply; drop older offers when the conversation moves on.
  function removeRetryButtons() {
    for (const button of els.messages.querySelectorAll('.retry-btn')) button.remove();
  }

  /* ------------------------------------------------------------------ */
  /* Server-sent events                                                  */
  /* ------------------------------------------------------------------ */

  /** Incremental text/event-stream parser: push() text chunks, get back parsed JSON payloads. */
  function createSseParser() {
    let buffer = '';

    function parseBlock(block) {
      const data = [];
      for (const line of block.split('\n')) {
        if (line === '' || line.startsWith(':')) continue; // comment / heartbeat
        if (line.startsWith('data:')) {
          const value = line.slice(5);
          data.push(value.startsWith(' ') ? value.slice(1) : value);
        }
        // Other fields (event:, id:, retry:) are not used by this API.
      }
      if (!data.length) return null;
      try {
        return JSON.parse(data.join('\n'));
      } catch (_) {
        console.warn('qwen-box: ignoring malformed event', data.join('\n'));
        return null;
      }
    }

    function drain(final) {
      // A chunk may end between "\r" and "\n": keep a trailing "\r" until more text arrives.
      let text = buffer;
      let carry = '';
      if (!final && text.endsWith('\r')) {
        carry = '\r';
        text = text.slice(0, -1);
      }
      const blocks = text.replace(/\r\n?/g, '\n').split('\n\n');
      buffer = (final ? '' : blocks.pop()) + carry;
      return blocks.map(parseBlock).filter(Boolean);
    }

    return {
      push(chunk) {
        buffer += chunk;
        return drain(false);
      },
      end() {
        return drain(true);
      },
    };
  }

  /**
   * Read the event stream into `reply` until a terminal event or the end of the body.
   * Returns {kind: 'done', event} | {kind: 'error', message}. Throws on network failure/abort.
   */
  async function readReplyStream(response, reply) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    const parser = createSseParser();

    const handle = (events) => {
      for (const event of events) {
        if (event.type === 'delta' && typeof event.text === 'string') {
          reply.text += event.text;
          scheduleRender(reply);
        } else if (event.type === 'done') {
          return { kind: 'done', event };
        } else if (event.type === 'error') {
          return { kind: 'error', message: event.error?.message || 'The model stopped with an error.' };
        }
      }
      return null;
    };

    for (;;) {
      const { value, done } = await reader.read();
      const outcome = done
        ? handle(parser.push(decoder.decode())) || handle(parser.end())
        : handle(parser.push(decoder.decode(value, { stream: true })));
      if (outcome) {
        reader.cancel().catch(() => {});
        return outcome;
      }
      if (done) {
        return { kind: 'error', message: 'The connection closed before the reply was finished.' };
      }
    }
  }


  const isAbort = (err) => err && err.name === 'AbortError';

  /* ------------------------------------------------------------------ */
  /* Chat flow                                                           */
  /* ------------------------------------------------------------------ */

  function submit() {
    const raw = els.input.value;
    const text = raw.replace(/^\s*\n/, '').trimEnd();
    if (!text.trim() || state.active || state.opening || state.health !== 'ready') return;

    const settings = readSettings();
    if (settings.error) {
      showError(settings.error);
      return;
    }
    hideError();
    removeRetryButtons();
    setInput('');
    els.input.focus();
    ask(text, settings.options);
  }

  /** Show `text` as the user's turn and ask for the reply; a refused request gives the text back. */
  function ask(text, options) {
    const userEl = appendUserMessage(text);
    state.history.push({ role: 'user', content: text });
    requestReply({ userEl, text, options });
  }

  /**
   * Where this turn is stored: the conversation on screen, a new one (created now, for the first
   * turn of a stored chat), or nowhere (private chat, or a server that keeps no history).
   * Resolves {id} (null = not stored) or {rejected: outcome}.
   */
  async function conversationFor(signal) {
    if (state.conversationId) return { id: state.conversationId };
    if (state.private || state.historyMode === 'off') return { id: null };
    const result = await api('POST', '/api/conversations', {}, signal);
    if (result.ok && typeof result.data?.id === 'string') {
      state.conversationId = result.data.id;
      remember(result.data.id);
      addConversation(result.data);
      return { id: result.data.id };
    }
    if (result.status === 404) {
      setHistoryMode('off'); // the server keeps nothing (HISTORY=off): this chat is private
      return { id: null };
    }
    return { rejected: { kind: 'rejected', message: apiFailure(result), status: result.status } };
  }

  /**
   * Ask the server for the next assistant turn (history already ends with the user turn).
   * `userEl` lets a refused send be undone: the text goes back into the input box.
   */
  async function requestReply({ userEl, text, options }) {
    const epoch = state.epoch;
    const reply = appendAssistantMessage();
    const controller = new AbortController();
    state.active = { controller, reply };
    updateControls();
    scrollToBottom();

    let outcome;
    let response = null;
    let target = { id: null };
    try {
      target = await conversationFor(controller.signal);
      if (target.rejected) {
        outcome = target.rejected;
      } else {
        response = await fetch('/api/chat', {
          method: 'POST',
          headers: chatHeaders(),
          body: JSON.stringify(buildPayload(options, target.id)),
          cache: 'no-store',
          signal: controller.signal,
        });
        if (!response.ok) {
          const body = await response.clone().json().catch(() => null);
          outcome = {
            kind: 'rejected', message: await errorMessageFrom(response), status: response.status,
            code: body?.error?.code,
          };
        } else {
          outcome = await readReplyStream(response, reply);
        }
      }
    } catch (err) {
      if (isAbort(err)) outcome = { kind: 'cancelled' };
      else if (!response) outcome = { kind: 'rejected', message: 'Could not reach the server. Check that it is running, then try again.' };
      else outcome = { kind: 'error', message: 'The connection was lost while the reply was streaming.' };
    }

    if (epoch !== state.epoch) {
      // Another chat is on screen now; the one left behind was stored (and maybe named) anyway.
      if (target.id) refreshList();
      return;
    }
    state.active = null;
    if (outcome.kind === 'rejected' && outcome.status === 404 && target.id) {
      conversationGone(target.id, outcome, { reply, userEl, text });
    } else {
      settle(reply, outcome, { userEl, text, options });
    }
    updateControls();
    // The server stores the exchange and names a new conversation after its first question.
    if (target.id && outcome.kind !== 'rejected') refreshList();
  }

  function settle(reply, outcome, ctx) {
    switch (outcome.kind) {
      case 'done': {
        const finish = outcome.event.finish_reason || 'stop';
        finishReply(reply, finish);
        if (finish === 'cancelled') markStopped(reply);
        else reply.meta.textContent = describeDone(outcome.event);
        keepInHistory(reply);
        break;
      }
      case 'cancelled':
        finishReply(reply, 'cancelled');
        markStopped(reply);
        keepInHistory(reply);
        break;
      case 'error':
        finishReply(reply, 'error');
        keepInHistory(reply);
        showReplyError(reply, outcome.message, () => retryReply(reply, ctx));
        showError(outcome.message);
        break;
      case 'rejected':
      default:
        if (ctx.userEl) {
          // Nothing was generated: undo the turn and give the text back for editing/resending.
          reply.el.remove();
          ctx.userEl.remove();
          removeLastUserTurn(ctx.text);
          restoreInput(ctx.text);
          updateEmptyState();
        } else {
          // A retry that failed again: keep the user's message and offer another retry.
          finishReply(reply, 'error');
          showReplyError(reply, outcome.message, () => retryReply(reply, ctx));
        }
        showError(outcome.message);
        if (outcome.status === 401) askForAccessToken();
        if (outcome.status === undefined || outcome.status === 503) pollHealth();
        break;
    }
  }

  /** The stored conversation went away (deleted elsewhere, or history turned off): start afresh. */
  function conversationGone(id, outcome, { reply, userEl, text }) {
    reply.el.remove();
    userEl?.remove();
    removeConversation(id);
    if (outcome.code === 'history_disabled') setHistoryMode('off');
    newChat();
    restoreInput(text);
    showError(outcome.code === 'history_disabled'
      ? 'History is now off on this server, so this chat can’t continue. Your message is back in the box: send it to start a private chat.'
      : 'This chat no longer exists on the server (deleted elsewhere?). Your message is back in the box: send it to start a new chat.');
  }

  function keepInHistory(reply) {
    if (!reply.text) return; // an empty turn adds nothing and may be rejected by the server
    state.history.push({ role: 'assistant', content: reply.text });
    reply.inHistory = true;
  }

  function removeLastUserTurn(text) {
    const last = state.history[state.history.length - 1];
    if (last && last.role === 'user' && last.content === text) state.history.pop();
  }

  /** Ask again after a failed reply. */
  function retryReply(reply, ctx) {
    if (state.active || state.health !== 'ready') {
      showError(state.health === 'ready' ? 'Wait for the current reply to finish.' : 'The model is not ready yet.');
      return;
    }
    hideError();
    const settings = readSettings();
    const options = settings.options || ctx.options;
    if (state.conversationId) {
      // The server has stored the failed reply as it ended; asking again is a new turn with the
      // same question, exactly as a reload of this conversation will show it.
      removeRetryButtons();
      ask(ctx.text, options);
      return;
    }
    // Private chat: drop the failed reply (and its partial text) and ask again with the same history.
    if (reply.inHistory) state.history.pop();
    reply.el.remove();
    requestReply({ userEl: null, text: ctx.text, options });
  }

  function stop() {
    if (state.active) state.active.controller.abort();
    els.input.focus();
  }

  /** Clear the chat on screen (aborting a reply in progress: the server keeps what it had). */
  function clearChat() {
    if (state.active) {
      state.active.controller.abort();
      state.active = null;
    }
    state.epoch += 1;
    state.opening = false;
    state.history = [];
    els.messages.replaceChildren();
    hideError();
  }

  function newChat() {
    clearChat();
    state.conversationId = null;
    state.pendingRestore = null;
    remember(null);
    markCurrent();
    updateEmptyState();
    updateControls();
    scrollToBottom();
    closeDrawer();
    els.input.focus();
  }

  /* ------------------------------------------------------------------ */
  /* Stored conversations                                                */
  /* ------------------------------------------------------------------ */

  /** Show a stored conversation and continue it. `restoring`: the page is bringing back the last one. */
  async function openConversation(id, { restoring = false } = {}) {
    closeDrawer();
    if (!restoring && id === state.conversationId && !state.opening) return;
    clearChat();
    const epoch = state.epoch;
    state.conversationId = id;
    state.private = false;
    state.opening = true;
    markCurrent();
    updateEmptyState();
    updateControls();

    let result = null;
    try {
      result = await api('GET', `/api/conversations/${encodeURIComponent(id)}`);
    } catch (_) {
      result = null;
    }
    if (epoch !== state.epoch) return; // the user moved on meanwhile
    state.opening = false;

    if (result?.ok && result.data && Array.isArray(result.data.messages)) {
      state.pendingRestore = null;
      remember(id);
      renderStoredConversation(result.data);
    } else {
      state.conversationId = null;
      if (result?.status === 404) {
        // Deleted (here or elsewhere), or history is off: start fresh, silently on a reload.
        remember(null);
        state.pendingRestore = null;
        removeConversation(id);
        if (result.data?.error?.code === 'history_disabled') setHistoryMode('off');
        if (!restoring) showError('That chat no longer exists.');
      } else if (result?.status === 401) {
        state.pendingRestore = id; // reopened once the token is entered
        if (!restoring) {
          showError(apiFailure(result));
          askForAccessToken();
        }
      } else {
        state.pendingRestore = id;
        showError(result ? `Couldn’t open that chat: ${apiFailure(result)}` : 'Couldn’t open that chat: the server is unreachable.');
      }
      markCurrent();
    }
    updateEmptyState();
    updateControls();
    scrollToBottom();
    if (!restoring) els.input.focus();
  }

  function renderStoredConversation(conversation) {
    for (const message of conversation.messages) {
      const content = typeof message.content === 'string' ? message.content : '';
      if (message.role === 'user') {
        appendUserMessage(content);
        state.history.push({ role: 'user', content });
      } else if (message.role === 'assistant') {
        const reply = renderStoredReply(message, content);
        if (content && reply.el.dataset.finish !== 'error') keepInHistory(reply);
      }
      // System turns are context the page did not show when they were sent either.
    }
    updateEmptyState();
    scrollToBottom();
  }

  /** A stored reply looks exactly like the live one did when it ended. */
  function renderStoredReply(message, content) {
    const reply = appendAssistantMessage();
    reply.text = content;
    const finish = !message.status || message.status === 'complete' ? 'stop' : String(message.status);
    finishReply(reply, finish);
    const meta = message.meta && typeof message.meta === 'object' ? message.meta : {};
    if (finish === 'cancelled') {
      markStopped(reply);
    } else if (finish === 'error') {
      showReplyError(reply, meta.error ? `generation failed: ${meta.error}` : 'The model stopped with an error.', null);
    } else {
      reply.meta.textContent = describeDone({ usage: meta.usage, timing: meta.timing, finish_reason: finish });
    }
    return reply;
  }

  /* ------------------------------------------------------------------ */
  /* Sidebar: the conversation list                                      */
  /* ------------------------------------------------------------------ */

  function setHistoryMode(mode) {
    const was = state.historyMode;
    state.historyMode = mode;
    if (mode === 'off' && was !== 'off') {
      // Nothing can be stored: the chat on screen continues as a private one.
      state.private = true;
      state.conversationId = null;
      state.pendingRestore = null;
      remember(null);
      state.side.items = [];
      state.side.next = null;
    } else if (was === 'off' && mode !== 'off' && chatIsEmpty()) {
      state.private = false;
    }
    renderSidebar();
    updateControls();
  }

  /**
   * The sidebar starts once health has said whether the server keeps history (so a server with
   * HISTORY=off is never asked for conversations), or at once if health cannot say yet (model
   * still loading): the conversations API answers without the model.
   */
  function startHistory() {
    if (state.historyStarted) return;
    state.historyStarted = true;
    loadList();
    const last = remembered();
    if (last && !state.conversationId && chatIsEmpty() && !state.active) {
      openConversation(last, { restoring: true });
    }
  }

  function historyFromHealth(enabled) {
    if (!enabled) {
      if (state.historyMode !== 'off') setHistoryMode('off');
    } else if (!state.historyStarted) {
      startHistory();
    } else if (state.historyMode === 'off' || state.historyMode === 'error') {
      loadList();
    }
  }

  /** Load the first page of the list (for the current search), or the next one (`more`). */
  async function loadList({ more = false, merge = false } = {}) {
    const side = state.side;
    const seq = ++side.seq;
    const params = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if (side.query) params.set('q', side.query);
    if (more && side.next) params.set('before', side.next);
    side.loading = true;
    renderSidebar();

    let result = null;
    try {
      result = await api('GET', `/api/conversations?${params}`);
    } catch (_) {
      result = null;
    }
    if (seq !== side.seq) return; // a newer request (another search) has been sent
    side.loading = false;

    if (!result) {
      if (more) showError('Couldn’t load more chats: the server is unreachable.');
      else setHistoryMode('error');
      renderSidebar();
      return;
    }
    if (result.status === 404) {
      setHistoryMode('off');
      return;
    }
    if (result.status === 401) {
      setHistoryMode('auth');
      return;
    }
    if (!result.ok || !Array.isArray(result.data?.data)) {
      if (more) showError(`Couldn’t load more chats: ${apiFailure(result)}`);
      else setHistoryMode('error');
      renderSidebar();
      return;
    }

    const page = result.data.data.filter((c) => c && typeof c.id === 'string');
    const next = result.data.next || null;
    if (more) {
      const have = new Set(side.items.map((c) => c.id));
      side.items = side.items.concat(page.filter((c) => !have.has(c.id)));
      side.next = next;
      side.pages += 1;
    } else if (merge && side.pages > 1) {
      // Keep the pages loaded with "Load more": the first page is new, the rest is unchanged.
      const fresh = new Set(page.map((c) => c.id));
      side.items = page.concat(side.items.filter((c) => !fresh.has(c.id)));
    } else {
      side.items = page;
      side.next = next;
      side.pages = 1;
    }
    if (state.historyMode !== 'on') setHistoryMode('on');
    else renderSidebar();
  }

  /** After a reply: titles and order change on the server (a new chat is named after its question). */
  function refreshList() {
    if (state.historyMode === 'on') loadList({ merge: true });
  }

  function addConversation(conversation) {
    const side = state.side;
    side.items = [conversation, ...side.items.filter((c) => c.id !== conversation.id)];
    if (!side.pages) side.pages = 1;
    if (state.historyMode !== 'on') setHistoryMode('on');
    else renderSidebar();
  }

  function removeConversation(id) {
    state.side.items = state.side.items.filter((c) => c.id !== id);
    renderSidebar();
  }

  function onSearchInput() {
    clearTimeout(state.side.searchTimer);
    state.side.searchTimer = setTimeout(() => {
      const query = els.search.value.trim();
      if (query === state.side.query) return;
      state.side.query = query;
      state.side.next = null;
      loadList();
    }, SEARCH_DEBOUNCE_MS);
  }

  function renderSidebar() {
    const side = state.side;
    const mode = state.historyMode;
    const off = mode === 'off';
    els.historyOffNote.hidden = !off;
    els.searchBox.hidden = off;
    els.list.hidden = off;

    let message = '';
    let retry = false;
    if (mode === 'auth') {
      message = 'This server needs an access token to show your chats. Enter it under Settings.';
    } else if (mode === 'error') {
      message = 'Couldn’t load your chats.';
      retry = true;
    } else if (mode === 'on' && !side.loading && side.items.length === 0) {
      message = side.query ? `No chats match “${side.query}”.` : 'No chats yet. Your conversations will appear here.';
    }
    els.sidebarMessage.hidden = !message;
    els.sidebarMessage.dataset.kind = mode === 'on' ? 'empty' : mode;
    els.sidebarMessageText.textContent = message;
    els.sidebarRetry.hidden = !retry;
    els.loadMore.hidden = mode !== 'on' || !side.next;
    els.loadMore.disabled = side.loading;
    els.list.setAttribute('aria-busy', String(side.loading));

    if (side.editingId) {
      side.dirty = true; // rebuilt when the rename ends, so the field keeps its focus
      return;
    }
    renderList();
  }

  function renderList() {
    state.side.dirty = false;
    const items = state.historyMode === 'on' ? state.side.items : [];
    const keep = new Set();
    const children = [];
    let group = null;
    const now = new Date();
    for (const conversation of items) {
      const label = groupLabel(conversation.updated_at, now);
      if (label !== group) {
        group = label;
        const heading = document.createElement('li');
        heading.className = 'conversation-group';
        heading.setAttribute('role', 'presentation');
        heading.textContent = label;
        children.push(heading);
      }
      let node = state.nodes.get(conversation.id);
      if (!node) {
        node = conversationItem(conversation.id);
        state.nodes.set(conversation.id, node);
      }
      setItemTitle(node, conversation.title);
      keep.add(conversation.id);
      children.push(node);
    }
    for (const id of [...state.nodes.keys()]) {
      if (!keep.has(id)) state.nodes.delete(id);
    }
    els.list.replaceChildren(...children);
    markCurrent();
  }

  function groupLabel(updatedAt, now) {
    const when = new Date(Number(updatedAt) * 1000);
    if (!Number.isFinite(when.getTime())) return 'Older';
    const startOfToday = new Date(now.getFullYear(), now.getMonth(), now.getDate()).getTime();
    const day = 24 * 3600 * 1000;
    const t = when.getTime();
    if (t >= startOfToday) return 'Today';
    if (t >= startOfToday - day) return 'Yesterday';
    if (t >= startOfToday - 7 * day) return 'Previous 7 days';
    if (t >= startOfToday - 30 * day) return 'Previous 30 days';
    return 'Older';
  }

  function svgIcon(paths) {
    const ns = 'http://www.w3.org/2000/svg';
    const svg = document.createElementNS(ns, 'svg');
    svg.setAttribute('viewBox', '0 0 24 24');
    svg.setAttribute('class', 'icon');
    svg.setAttribute('aria-hidden', 'true');
    svg.setAttribute('focusable', 'false');
    for (const d of paths) {
      const path = document.createElementNS(ns, 'path');
      path.setAttribute('d', d);
      path.setAttribute('fill', 'none');
      path.setAttribute('stroke', 'currentColor');
      path.setAttribute('stroke-width', '1.8');
      path.setAttribute('stroke-linecap', 'round');
      path.setAttribute('stroke-linejoin', 'round');
      svg.append(path);
    }
    return svg;
  }

  const ICON_RENAME = ['M4 20h4L19 9a2.1 2.1 0 0 0-4-4L4 16v4z', 'M13.5 6.5l4 4'];
  const ICON_DELETE = ['M4 7h16', 'M10 11v6M14 11v6', 'M6 7l1 12a2 2 0 0 0 2 2h6a2 2 0 0 0 2-2l1-12', 'M9 7V4h6v3'];

  function button(className, text, testid) {
    const b = document.createElement('button');
    b.type = 'button';
    b.className = className;
    if (text) b.textContent = text;
    if (testid) b.dataset.testid = testid;
    return b;
  }

  /** One list item: open, rename and delete buttons; a rename field and a delete confirmation. */
  function conversationItem(id) {
    const li = document.createElement('li');
    li.className = 'conversation';
    li.dataset.testid = 'conversation';
    li.dataset.id = id;

    const row = document.createElement('div');
    row.className = 'conversation-row';
    const open = button('conversation-open');
    const title = document.createElement('span');
    title.className = 'conversation-title';
    title.dataset.testid = 'conversation-title';
    open.append(title);
    open.addEventListener('click', () => openConversation(id));

    const actions = document.createElement('div');
    actions.className = 'conversation-actions';
    const rename = button('icon-btn', '', 'conversation-rename');
    rename.append(svgIcon(ICON_RENAME));
    rename.addEventListener('click', () => startRename(li));
    const remove = button('icon-btn icon-btn-danger', '', 'conversation-delete');
    remove.append(svgIcon(ICON_DELETE));
    remove.addEventListener('click', () => askDelete(li));
    actions.append(rename, remove);
    row.append(open, actions);

    li.append(row);
    return li;
  }

  /* The rename field and the delete confirmation exist only while in use: one at a time. */
  function renameField(li) {
    const edit = document.createElement('input');
    edit.type = 'text';
    edit.className = 'conversation-title-input';
    edit.dataset.testid = 'conversation-title-input';
    edit.maxLength = TITLE_MAX;
    edit.setAttribute('aria-label', 'Chat title');
    edit.addEventListener('keydown', (event) => {
      if (event.key === 'Enter' && !event.isComposing) {
        event.preventDefault();
        finishRename(li, true);
      } else if (event.key === 'Escape') {
        event.preventDefault();
        event.stopPropagation();
        finishRename(li, false);
      }
    });
    edit.addEventListener('blur', () => finishRename(li, true));
    return edit;
  }

  function deleteConfirmation(li) {
    const confirm = document.createElement('div');
    confirm.className = 'conversation-confirm';
    confirm.setAttribute('role', 'group');
    confirm.setAttribute('aria-label', 'Confirm delete');
    const question = document.createElement('span');
    question.className = 'confirm-text';
    question.textContent = 'Delete chat?';
    const yes = button('btn-small btn-danger', 'Delete', 'confirm-delete');
    yes.addEventListener('click', () => deleteConversation(li));
    const no = button('btn-small', 'Cancel', 'cancel-delete');
    no.addEventListener('click', () => cancelDelete(li));
    confirm.addEventListener('keydown', (event) => {
      if (event.key === 'Escape') {
        event.stopPropagation();
        cancelDelete(li);
      }
    });
    confirm.append(question, yes, no);
    return confirm;
  }

  function setItemTitle(li, title) {
    const text = typeof title === 'string' && title.trim() ? title : 'New chat';
    const el = li.querySelector('.conversation-title');
    if (el.textContent !== text) el.textContent = text;
    li.querySelector('.conversation-open').title = text;
    li.querySelector('[data-testid="conversation-rename"]').setAttribute('aria-label', `Rename “${text}”`);
    li.querySelector('[data-testid="conversation-delete"]').setAttribute('aria-label', `Delete “${text}”`);
  }

  function markCurrent() {
    for (const [id, li] of state.nodes) {
      const current = id === state.conversationId;
      li.classList.toggle('is-current', current);
      const open = li.querySelector('.conversation-open');
      if (current) open.setAttribute('aria-current', 'page');
      else open.removeAttribute('aria-current');
    }
  }

  function itemData(id) {
    return state.side.items.find((c) => c.id === id);
  }

  function startRename(li) {
    const editing = state.side.editingId;
    if (editing) {
      const other = state.nodes.get(editing);
      if (other) finishRename(other, true);
    }
    for (const node of state.nodes.values()) cancelDelete(node);
    const edit = renameField(li);
    edit.value = itemData(li.dataset.id)?.title || li.querySelector('.conversation-title').textContent;
    state.side.editingId = li.dataset.id;
    li.classList.add('is-editing');
    li.querySelector('.conversation-row').hidden = true;
    li.append(edit);
    edit.focus();
    edit.select();
  }

  async function finishRename(li, save) {
    const id = li.dataset.id;
    const edit = li.querySelector('.conversation-title-input');
    if (state.side.editingId !== id || !edit) return;
    const title = edit.value.replace(/\s+/g, ' ').trim();
    const before = itemData(id)?.title;
    const hadFocus = document.activeElement === edit;
    state.side.editingId = null;
    li.classList.remove('is-editing');
    edit.remove(); // its blur event finds editingId cleared and does nothing
    li.querySelector('.conversation-row').hidden = false;
    if (state.side.dirty) renderList();
    if (hadFocus) li.querySelector('.conversation-open').focus();
    if (!save || !title || title === before) return;

    setItemTitle(li, title); // at once; put back if the server refuses
    let result = null;
    try {
      result = await api('PATCH', `/api/conversations/${encodeURIComponent(id)}`, { title });
    } catch (_) {
      result = null;
    }
    const conversation = itemData(id);
    if (result?.ok && result.data) {
      if (conversation) conversation.title = result.data.title;
      setItemTitle(li, result.data.title);
    } else {
      setItemTitle(li, before);
      if (result?.status === 404) removeConversation(id);
      showError(result ? `Couldn’t rename the chat: ${apiFailure(result)}` : 'Couldn’t rename the chat: the server is unreachable.');
    }
  }

  function askDelete(li) {
    if (state.side.editingId) {
      const other = state.nodes.get(state.side.editingId);
      if (other) finishRename(other, true);
    }
    for (const other of state.nodes.values()) if (other !== li) cancelDelete(other);
    if (li.classList.contains('is-confirming')) return;
    li.classList.add('is-confirming');
    li.querySelector('.conversation-row').hidden = true;
    const confirm = deleteConfirmation(li);
    li.append(confirm);
    confirm.querySelector('[data-testid="cancel-delete"]').focus();
  }

  function cancelDelete(li) {
    const confirm = li.querySelector('.conversation-confirm');
    if (!confirm) return;
    const hadFocus = li.contains(document.activeElement);
    li.classList.remove('is-confirming');
    confirm.remove();
    li.querySelector('.conversation-row').hidden = false;
    if (hadFocus) li.querySelector('[data-testid="conversation-delete"]').focus();
  }

  async function deleteConversation(li) {
    const id = li.dataset.id;
    const yes = li.querySelector('[data-testid="confirm-delete"]');
    yes.disabled = true;
    let result = null;
    try {
      result = await api('DELETE', `/api/conversations/${encodeURIComponent(id)}`);
    } catch (_) {
      result = null;
    }
    yes.disabled = false;
    if (result && (result.ok || result.status === 404)) {
      // 404: already gone (deleted in another tab), which is what was asked.
      const hadFocus = li.contains(document.activeElement);
      const next = li.nextElementSibling?.matches('.conversation') ? li.nextElementSibling
        : li.previousElementSibling?.matches('.conversation') ? li.previousElementSibling : null;
      if (id === state.conversationId) newChat();
      if (remembered() === id) remember(null);
      removeConversation(id);
      if (hadFocus && document.activeElement !== els.input) {
        (next?.querySelector('.conversation-open') || els.newChat).focus();
      }
    } else {
      cancelDelete(li);
      showError(result ? `Couldn’t delete the chat: ${apiFailure(result)}` : 'Couldn’t delete the chat: the server is unreachable.');
    }
  }

  /* Phone width: the sidebar is a drawer over the page. */
  function openDrawer() {
    els.app.classList.add('drawer-open');
    els.sidebarToggle.setAttribute('aria-expanded', 'true');
    els.backdrop.hidden = false;
    els.sidebarClose.focus();
  }

  function closeDrawer() {
    if (!els.app.classList.contains('drawer-open')) return;
    const hadFocus = els.sidebar.contains(document.activeElement);
    els.app.classList.remove('drawer-open');
    els.sidebarToggle.setAttribute('aria-expanded', 'false');
    els.backdrop.hidden = true;
    if (hadFocus) els.sidebarToggle.focus();
  }

  /* ------------------------------------------------------------------ */
  /* Models                                                              */
  /* ------------------------------------------------------------------ */

  const MODEL_STATES = { loaded: 'loaded', loading: 'loading…', failed: 'failed', available: 'available' };

  /** GET /api/models; while a model is loading, again every 2 s. A server without it: no dropdown. */
  async function loadModels() {
    const models = state.models;
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
    if (loading || models.pending) models.timer = setTimeout(loadModels, MODELS_POLL_MS);
    // The active model changed or finished loading: the status line and welcome text follow health.
    if ((previousActive && previousActive !== models.active) || (wasLoading && !loading)) pollHealth();
  }

  function renderModels() {
    const models = state.models;
    const show = models.supported === true && models.list.length > 1;
    els.modelPicker.hidden = !show;
    if (state.health === 'ready') setHealth('ready', readyText());
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
      text = `${shortModelName(failed.id)} failed to load${failed.error ? `: ${failed.error}` : ''}`;
      kind = 'error';
    }
    els.modelState.hidden = !text;
    els.modelState.dataset.state = kind;
    els.modelState.title = text;
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

  async function chooseModel() {
    const models = state.models;
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

  /* ------------------------------------------------------------------ */
  /* Wiring                                                              */
  /* ------------------------------------------------------------------ */

  function onInputKeydown(event) {
    // keyCode 229: some browsers report IME composition this way instead of isComposing.
    if (event.key !== 'Enter' || event.shiftKey || event.isComposing || event.keyCode === 229) return;
    event.preventDefault();
    submit();
  }

  function onGlobalKeydown(event) {
    if (event.key !== 'Escape' || event.isComposing) return;
    if (els.app.classList.contains('drawer-open')) {
      event.preventDefault();
      closeDrawer();
    } else if (state.active) {
      event.preventDefault();
      stop();
    }
  }

  function setSettingsOpen(open) {
    els.settings.hidden = !open;
    els.settingsToggle.setAttribute('aria-expanded', String(open));
  }

  function openSettings() {
    closeDrawer();
    setSettingsOpen(true);
  }

  function toggleSettings() {
    const open = els.settings.hidden;
    setSettingsOpen(open);
    if (open) els.systemPrompt.focus();
  }

  function useExample(button) {
    setInput(button.dataset.prompt || button.textContent.trim());
    if (state.health === 'ready' && !state.active) submit();
    else els.input.focus();
  }

  function onPrivateToggle() {
    if (state.historyMode === 'off' || !chatIsEmpty() || state.active) {
      updatePrivacy(); // not changeable now: show the real state again
      return;
    }
    state.private = els.privateToggle.checked;
    if (state.private && state.conversationId) {
      // An empty stored chat (its first send was refused) becomes a private one.
      state.conversationId = null;
      remember(null);
      markCurrent();
    }
    updatePrivacy();
    els.input.focus();
  }

  function init() {
    els.composer.addEventListener('submit', (event) => {
      event.preventDefault();
      submit();
    });
    els.input.addEventListener('keydown', onInputKeydown);
    els.input.addEventListener('input', syncInputHeight);
    els.stop.addEventListener('click', stop);
    els.newChat.addEventListener('click', newChat);
    els.newChatCompact.addEventListener('click', newChat);
    els.settingsToggle.addEventListener('click', toggleSettings);
    els.errorClose.addEventListener('click', hideError);
    els.accessToken.addEventListener('input', saveAccessToken);
    els.jump.addEventListener('click', scrollToBottom);
    els.scroller.addEventListener('scroll', onScroll, { passive: true });
    els.privateToggle.addEventListener('change', onPrivateToggle);
    els.sidebarToggle.addEventListener('click', openDrawer);
    els.sidebarClose.addEventListener('click', closeDrawer);
    els.backdrop.addEventListener('click', closeDrawer);
    els.search.addEventListener('input', onSearchInput);
    els.search.addEventListener('keydown', (event) => {
      if (event.key === 'Escape' && els.search.value) {
        event.stopPropagation();
        els.search.value = '';
        onSearchInput();
      }
    });
    els.loadMore.addEventListener('click', () => loadList({ more: true }));
    els.sidebarRetry.addEventListener('click', () => loadList());
    els.modelSelect.addEventListener('change', chooseModel);
    document.addEventListener('keydown', onGlobalKeydown);

    els.welcome.addEventListener('click', (event) => {
      const button = event.target.closest('.example');
      if (button) useExample(button);
    });
    els.messages.addEventListener('click', (event) => {
      const button = event.target.closest('.copy-btn');
      if (button) copyCode(button);
    });
    document.addEventListener('visibilitychange', () => {
      if (document.visibilityState === 'visible') pollHealth();
    });

    loadAccessToken();
    syncInputHeight();
    updateEmptyState();
    updateControls();
    renderSidebar();
    pollHealth(); // starts the sidebar (see startHistory)
    loadModels();
    els.input.focus();
  }

  init();
})();
