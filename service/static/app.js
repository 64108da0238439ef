/* qwen-box chat page.
 *
 * Plain browser JS, no build step. Talks only to this origin:
 *   GET  /api/health   model state, polled
 *   POST /api/chat     {"messages": [...], "stream": true, ...} -> text/event-stream
 *
 * CSP-ready: no inline scripts or handlers, and no element.style writes
 * (visibility is toggled with the `hidden` attribute, looks with classes).
 * Model output is untrusted: it is rendered with marked, raw HTML is escaped,
 * and the result is sanitised with DOMPurify before it touches the DOM.
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

  const els = {
    status: document.getElementById('status'),
    settingsToggle: document.getElementById('settings-toggle'),
    settings: document.getElementById('settings'),
    systemPrompt: document.getElementById('system-prompt'),
    maxTokens: document.getElementById('max-tokens'),
    temperature: document.getElementById('temperature'),
    accessToken: document.getElementById('access-token'),
    newChat: document.getElementById('new-chat'),
    scroller: document.getElementById('scroller'),
    welcome: document.getElementById('welcome'),
    messages: document.getElementById('messages'),
    jump: document.getElementById('jump'),
    notice: document.getElementById('notice'),
    noticeText: document.getElementById('notice-text'),
    error: document.getElementById('error'),
    errorText: document.getElementById('error-text'),
    errorClose: document.getElementById('error-close'),
    composer: document.getElementById('composer'),
    growWrap: document.getElementById('grow-wrap'),
    input: document.getElementById('input'),
    send: document.getElementById('send'),
    stop: document.getElementById('stop'),
  };

  const state = {
    health: 'loading',        // loading | ready | error | offline
    healthTimer: 0,
    healthInFlight: false,
    history: [],              // finished turns, as sent to the server: {role, content}
    active: null,             // the reply currently streaming: {controller, reply}
    conversation: 0,          // bumped by "New chat" so late callbacks of an old stream are ignored
    stickToBottom: true,
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
    try {
      const res = await fetch('/api/health', {
        cache: 'no-store',
        headers: { Accept: 'application/json' },
        signal: timeoutSignal(HEALTH_TIMEOUT_MS),
      });
      const body = await res.json().catch(() => ({}));
      if (res.ok && body.status === 'ok') {
        setHealth('ready', `Ready · ${body.model || 'model'}`);
        next = HEALTH_POLL_READY_MS;
      } else if (body.status === 'loading') {
        setHealth('loading', 'Loading model…');
      } else if (body.status === 'error') {
        const detail = String(body.detail || body.error?.message || 'The model failed to load.');
        setHealth('error', `Error: ${detail}`, detail);
        next = HEALTH_POLL_ERROR_MS;
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
  }

  function timeoutSignal(ms) {
    if (AbortSignal.timeout) return AbortSignal.timeout(ms);
    const controller = new AbortController();
    setTimeout(() => controller.abort(), ms);
    return controller.signal;
  }

  /* ------------------------------------------------------------------ */
  /* Controls, banners, scrolling                                        */
  /* ------------------------------------------------------------------ */

  function updateControls() {
    const streaming = Boolean(state.active);
    els.send.hidden = streaming;
    els.stop.hidden = !streaming;
    els.send.disabled = state.health !== 'ready';
    els.send.title = state.health === 'ready' ? 'Send (Enter)' : 'The model is not ready yet';
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
    els.welcome.hidden = els.messages.childElementCount > 0;
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

  /* The server may require `Authorization: Bearer TOKEN` on /api/chat (ACCESS_TOKEN). The token
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
  }

  function chatHeaders() {
    const headers = { 'Content-Type': 'application/json', Accept: 'text/event-stream' };
    const token = els.accessToken.value.trim();
    if (token) headers.Authorization = `Bearer ${token}`;
    return headers;
  }

  function askForAccessToken() {
    openSettings();
    els.accessToken.focus();
  }

  function buildPayload(options) {
    const messages = [];
    const system = els.systemPrompt.value.trim();
    if (system) messages.push({ role: 'system', content: system });
    messages.push(...state.history);
    return { messages, stream: true, ...options };
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

  function showReplyError(reply, message, retry) {
    const box = document.createElement('div');
    box.className = 'reply-error';
    const text = document.createElement('span');
    text.className = 'reply-error-text';
    text.textContent = message;
    const button = document.createElement('button');
    button.type = 'button';
    button.className = 'btn-small retry-btn';
    button.textContent = 'Retry';
    button.addEventListener('click', retry);
    box.append(text, button);
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

  async function errorMessageFrom(response) {
    if (response.status === 401) {
      return 'This server needs an access token. Enter it under Settings, then send again.';
    }
    let message = '';
    try {
      const body = await response.json();
      message = body?.error?.message || body?.detail || '';
    } catch (_) {
      // not JSON
    }
    if (!message) message = `The server answered ${response.status} ${response.statusText}`.trim() + '.';
    if (response.status === 429 && !/too many|rate/i.test(message)) message = `Too many requests (limit: ${message}).`;
    const retryAfter = response.headers.get('Retry-After');
    if (retryAfter && /^\d+$/.test(retryAfter.trim()) && !/retry/i.test(message)) {
      message += ` Retry in ${retryAfter.trim()} s.`;
    }
    return message;
  }

  const isAbort = (err) => err && err.name === 'AbortError';

  /* ------------------------------------------------------------------ */
  /* Chat flow                                                           */
  /* ------------------------------------------------------------------ */

  function submit() {
    const raw = els.input.value;
    const text = raw.replace(/^\s*\n/, '').trimEnd();
    if (!text.trim() || state.active || state.health !== 'ready') return;

    const settings = readSettings();
    if (settings.error) {
      showError(settings.error);
      return;
    }
    hideError();
    removeRetryButtons();

    const userEl = appendUserMessage(text);
    state.history.push({ role: 'user', content: text });
    setInput('');
    els.input.focus();
    requestReply({ userEl, userText: text, options: settings.options });
  }

  /**
   * Ask the server for the next assistant turn (history already ends with the user turn).
   * `userEl`/`userText` let a failed send be undone: the text goes back into the input box.
   */
  async function requestReply({ userEl, userText, options }) {
    const conversation = state.conversation;
    const reply = appendAssistantMessage();
    const controller = new AbortController();
    state.active = { controller, reply };
    updateControls();
    scrollToBottom();

    const payload = buildPayload(options);
    let outcome;
    let response = null;
    try {
      response = await fetch('/api/chat', {
        method: 'POST',
        headers: chatHeaders(),
        body: JSON.stringify(payload),
        cache: 'no-store',
        signal: controller.signal,
      });
      if (!response.ok) {
        outcome = { kind: 'rejected', message: await errorMessageFrom(response), status: response.status };
      } else {
        outcome = await readReplyStream(response, reply);
      }
    } catch (err) {
      if (isAbort(err)) outcome = { kind: 'cancelled' };
      else if (!response) outcome = { kind: 'rejected', message: 'Could not reach the server. Check that it is running, then try again.' };
      else outcome = { kind: 'error', message: 'The connection was lost while the reply was streaming.' };
    }

    if (conversation !== state.conversation) return; // "New chat" was pressed meanwhile
    state.active = null;
    settle(reply, outcome, { userEl, userText, options });
    updateControls();
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
        showReplyError(reply, outcome.message, () => retryReply(reply, ctx.options));
        showError(outcome.message);
        break;
      case 'rejected':
      default:
        if (ctx.userEl) {
          // Nothing was generated: undo the turn and give the text back for editing/resending.
          reply.el.remove();
          ctx.userEl.remove();
          removeLastUserTurn(ctx.userText);
          restoreInput(ctx.userText);
          updateEmptyState();
        } else {
          // A retry that failed again: keep the user's message and offer another retry.
          finishReply(reply, 'error');
          showReplyError(reply, outcome.message, () => retryReply(reply, ctx.options));
        }
        showError(outcome.message);
        if (outcome.status === 401) askForAccessToken();
        if (outcome.status === undefined || outcome.status === 503) pollHealth();
        break;
    }
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

  /** Drop a failed reply (and its partial text) and ask again with the same history. */
  function retryReply(reply, options) {
    if (state.active || state.health !== 'ready') {
      showError(state.health === 'ready' ? 'Wait for the current reply to finish.' : 'The model is not ready yet.');
      return;
    }
    if (reply.inHistory) state.history.pop();
    reply.el.remove();
    hideError();
    const settings = readSettings();
    requestReply({ userEl: null, userText: null, options: settings.options || options });
  }

  function stop() {
    if (state.active) state.active.controller.abort();
    els.input.focus();
  }

  function newChat() {
    if (state.active) {
      state.active.controller.abort();
      state.active = null;
    }
    state.conversation += 1;
    state.history = [];
    els.messages.replaceChildren();
    hideError();
    updateEmptyState();
    updateControls();
    scrollToBottom();
    els.input.focus();
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
    if (event.key === 'Escape' && !event.isComposing && state.active) {
      event.preventDefault();
      stop();
    }
  }

  function setSettingsOpen(open) {
    els.settings.hidden = !open;
    els.settingsToggle.setAttribute('aria-expanded', String(open));
  }

  function openSettings() {
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

  function init() {
    els.composer.addEventListener('submit', (event) => {
      event.preventDefault();
      submit();
    });
    els.input.addEventListener('keydown', onInputKeydown);
    els.input.addEventListener('input', syncInputHeight);
    els.stop.addEventListener('click', stop);
    els.newChat.addEventListener('click', newChat);
    els.settingsToggle.addEventListener('click', toggleSettings);
    els.errorClose.addEventListener('click', hideError);
    els.accessToken.addEventListener('input', saveAccessToken);
    els.jump.addEventListener('click', scrollToBottom);
    els.scroller.addEventListener('scroll', onScroll, { passive: true });
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
    pollHealth();
    els.input.focus();
  }

  init();
})();
