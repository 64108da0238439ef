/* The chat on screen: its turns (`history`), the reply streaming now, whether it is stored on the
 * server (`conversationId`) or private, and the flow: send, stream, stop, retry, start a new chat,
 * open a stored one. A stored chat sends only the new user turn plus `conversation_id` (the server
 * adds the stored turns); a private one sends the whole conversation and nothing is stored. Which
 * stored chat is on screen survives a reload (localStorage). Also the Send/Stop and Private
 * controls, whose state follows from the chat's. */

import { els } from './dom.js';
import { hasPending, renderThumbnails, restorePending, takePending } from './attach.js';
import { api, apiFailure, errorMessageFrom, streamChat } from './api.js';
import { isReady, pollHealth } from './health.js';
import {
  appendAssistantMessage, appendUserMessage, describeDone, finishReply, markStopped, messageText,
  removeRetryButtons, renderStoredReply, renderVersions, replyOf, scheduleRender, showReplyError,
  showVersion,
} from './messages.js';
import { askForAccessToken, readSettings, systemPrompt } from './settings.js';
import {
  addConversation, closeDrawer, historyMode, markCurrent, refreshList, removeConversation, setHistoryMode,
} from './sidebar.js';
import { readEvents } from './sse.js';
import { copyOrSelect, hideError, restoreInput, scrollToBottom, setInput, showError } from './ui.js';

const CONVERSATION_KEY = 'qwen-box.conversation';

const chat = {
  history: [],              // finished turns of the chat on screen: {role, content}
  active: null,             // the reply currently streaming: {controller, reply}
  epoch: 0,                 // bumped whenever the chat on screen changes, so late callbacks are ignored
  conversationId: null,     // the stored conversation on screen; null = a new (or private) chat
  private: false,           // this chat is not stored (sticky across "New chat")
  opening: false,           // a stored conversation is being fetched
  pendingRestore: null,     // id to reopen once the access token is known
};

/** A reply is streaming. */
export function isStreaming() {
  return Boolean(chat.active);
}

/** The stored conversation on screen, or null. */
export function currentConversationId() {
  return chat.conversationId;
}

function chatIsEmpty() {
  return els.messages.childElementCount === 0 && !chat.opening;
}

/** Send/Stop and the Private switch follow the health, the stream and the chat. */
export function updateControls() {
  const streaming = Boolean(chat.active);
  updateActions();
  els.send.hidden = streaming;
  els.stop.hidden = !streaming;
  els.send.disabled = !isReady() || chat.opening;
  els.send.title = isReady() ? 'Send (Enter)' : 'The model is not ready yet';
  updatePrivacy();
}

/** The Private switch: forced on when the server keeps nothing; fixed once a chat has started. */
function updatePrivacy() {
  const off = historyMode() === 'off';
  const isPrivate = off || chat.private;
  const locked = off || !chatIsEmpty() || Boolean(chat.active);
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
  if (!off && locked && !chat.active) title = 'Applies to a whole chat: start a new chat to change it';
  els.privateHint.textContent = hint;
  els.privateHint.hidden = !hint;
  els.privateToggle.parentElement.title = title;
}

/** The welcome shows only while the chat is empty. */
export function updateEmptyState() {
  els.welcome.hidden = els.messages.childElementCount > 0 || chat.opening;
  els.messages.setAttribute('aria-busy', String(chat.opening));
}

/** A private chat sends every turn: older turns keep their images only while the request stays
 *  within the server's MAX_IMAGES (4 unless the menu says otherwise), newest first. */
function newestImages(turns, max = 4) {
  let room = max;
  return [...turns].reverse().map((turn) => {
    if (!turn.images) return turn;
    const images = turn.images.slice(Math.max(0, turn.images.length - room));
    room -= images.length;
    return images.length ? { ...turn, images } : { role: turn.role, content: turn.content };
  }).reverse();
}

/** The chat request: stored chats send only the new turn (the server has the rest). */
function buildPayload(options, conversationId) {
  const messages = [];
  const system = systemPrompt();
  if (system) messages.push({ role: 'system', content: system });
  if (conversationId) {
    // The stored turns are the server's: only the new one goes out.
    messages.push(chat.history[chat.history.length - 1]);
    return { conversation_id: conversationId, messages, stream: true, ...options };
  }
  messages.push(...newestImages(chat.history));
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

/** A stored chat was deleted: a reload must not try to reopen it. */
export function forgetConversation(id) {
  if (remembered() === id) remember(null);
}

/** The sidebar has started: bring back the stored chat that was on screen before the reload. */
export function restoreLastChat() {
  const last = remembered();
  if (last && !chat.conversationId && chatIsEmpty() && !chat.active) {
    openConversation(last, { restoring: true });
  }
}

/** A new access token: reopen the chat that the server refused to show without one. */
export function reopenAfterToken() {
  if (chat.pendingRestore && !chat.conversationId && chatIsEmpty()) {
    openConversation(chat.pendingRestore, { restoring: true });
  }
}

/** The server keeps nothing any more: the chat on screen continues as a private one. */
export function continuePrivately() {
  chat.private = true;
  chat.conversationId = null;
  chat.pendingRestore = null;
  remember(null);
}

/** The server keeps history again: an empty chat may be stored again. */
export function allowStoring() {
  if (chatIsEmpty()) chat.private = false;
}

const isAbort = (err) => err && err.name === 'AbortError';

/**
 * Read the event stream into `reply` until a terminal event or the end of the body.
 * Returns {kind: 'done', event} | {kind: 'error', message}. Throws on network failure/abort.
 */
async function readReply(response, reply) {
  const outcome = await readEvents(response, (event) => {
    if (event.type === 'delta' && typeof event.text === 'string') {
      reply.text += event.text;
      scheduleRender(reply);
    } else if (event.type === 'done') {
      return { kind: 'done', event };
    } else if (event.type === 'error') {
      return { kind: 'error', message: event.error?.message || 'The model stopped with an error.' };
    }
    return null;
  });
  return outcome || { kind: 'error', message: 'The connection closed before the reply was finished.' };
}

/* ------------------------------------------------------------------ */
/* Chat flow                                                           */
/* ------------------------------------------------------------------ */

/** Send what is in the message box (Enter or the Send button). */
export function submit() {
  const raw = els.input.value;
  const text = raw.replace(/^\s*\n/, '').trimEnd();
  if ((!text.trim() && !hasPending()) || chat.active || chat.opening || !isReady()) return;

  const settings = readSettings();
  if (settings.error) {
    showError(settings.error);
    return;
  }
  hideError();
  removeRetryButtons();
  setInput('');
  els.input.focus();
  ask(text, settings.options, takePending());
}

/** Show `text` (and its images) as the user's turn and ask for the reply; a refused request gives
 *  the text and the images back to the composer. */
function ask(text, options, images = []) {
  const userEl = appendUserMessage(text);
  renderThumbnails(userEl, { urls: images });
  updateEmptyState();
  chat.history.push(images.length ? { role: 'user', content: text, images } : { role: 'user', content: text });
  requestReply({ userEl, text, options, images });
}

/**
 * Where this turn is stored: the conversation on screen, a new one (created now, for the first
 * turn of a stored chat), or nowhere (private chat, or a server that keeps no history).
 * Resolves {id} (null = not stored) or {rejected: outcome}.
 */
async function conversationFor(signal) {
  if (chat.conversationId) return { id: chat.conversationId };
  if (chat.private || historyMode() === 'off') return { id: null };
  const result = await api('POST', '/api/conversations', {}, signal);
  if (result.ok && typeof result.data?.id === 'string') {
    chat.conversationId = result.data.id;
    remember(result.data.id);
    addConversation(result.data);
    return { id: result.data.id, created: true };
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
async function requestReply({ userEl, text, options, images = [] }) {
  const epoch = chat.epoch;
  const reply = appendAssistantMessage();
  updateEmptyState();
  const controller = new AbortController();
  chat.active = { controller, reply };
  updateControls();
  scrollToBottom();

  let outcome;
  let target = { id: null };
  try {
    target = await conversationFor(controller.signal);
  } catch (err) {
    target = { rejected: isAbort(err) ? { kind: 'cancelled' } : unreachable() };
  }
  if (target.rejected) outcome = target.rejected;
  else outcome = await streamInto(reply, buildPayload(options, target.id), controller.signal);
  if (target.created && outcome.kind === 'rejected') {
    // The model never took the first message: the new conversation holds nothing, so it goes.
    discardEmptyConversation(target.id);
    target = { id: null };
  }

  if (epoch !== chat.epoch) {
    // Another chat is on screen now; the one left behind was stored (and maybe named) anyway.
    if (target.id) refreshList();
    return;
  }
  chat.active = null;
  if (outcome.kind === 'rejected' && outcome.status === 404 && target.id) {
    conversationGone(target.id, outcome, { reply, userEl, text, images });
  } else {
    settle(reply, outcome, { userEl, text, options, images });
  }
  updateControls();
  // The server stores the exchange and names a new conversation after its first question.
  if (target.id && outcome.kind !== 'rejected') refreshList();
}

const unreachable = () => ({
  kind: 'rejected', message: 'Could not reach the server. Check that it is running, then try again.',
});

/** POST the chat and read its stream into `reply`; resolves the outcome (never throws). */
async function streamInto(reply, payload, signal) {
  let response = null;
  try {
    response = await streamChat(payload, signal);
    if (!response.ok) {
      const body = await response.clone().json().catch(() => null);
      return {
        kind: 'rejected', message: await errorMessageFrom(response), status: response.status,
        code: body?.error?.code,
      };
    }
    return await readReply(response, reply);
  } catch (err) {
    if (isAbort(err)) return { kind: 'cancelled' };
    if (!response) return unreachable();
    return { kind: 'error', message: 'The connection was lost while the reply was streaming.' };
  }
}

/** A conversation created for a first message that the model never took: delete it again. */
function discardEmptyConversation(id) {
  removeConversation(id);
  if (chat.conversationId === id) {
    chat.conversationId = null;
    remember(null);
    markCurrent();
  }
  api('DELETE', `/api/conversations/${encodeURIComponent(id)}`).catch(() => {});
}

function settle(reply, outcome, ctx) {
  switch (outcome.kind) {
    case 'done': {
      const finish = outcome.event.finish_reason || 'stop';
      finishReply(reply, finish);
      if (finish === 'cancelled') markStopped(reply);
      else reply.meta.textContent = describeDone(outcome.event);
      reply.doneMeta = { usage: outcome.event.usage, timing: outcome.event.timing };
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
        restorePending(ctx.images || []); // e.g. too many images, or a model that cannot see them
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
function conversationGone(id, outcome, { reply, userEl, text, images = [] }) {
  reply.el.remove();
  userEl?.remove();
  removeConversation(id);
  if (outcome.code === 'history_disabled') setHistoryMode('off');
  newChat();
  restoreInput(text);
  restorePending(images);
  showError(outcome.code === 'history_disabled'
    ? 'History is now off on this server, so this chat can’t continue. Your message is back in the box: send it to start a private chat.'
    : 'This chat no longer exists on the server (deleted elsewhere?). Your message is back in the box: send it to start a new chat.');
}

function keepInHistory(reply) {
  if (!reply.text) return; // an empty turn adds nothing and may be rejected by the server
  reply.entry = { role: 'assistant', content: reply.text };
  chat.history.push(reply.entry);
  reply.inHistory = true;
}

function removeLastUserTurn(text) {
  const last = chat.history[chat.history.length - 1];
  if (last && last.role === 'user' && last.content === text) chat.history.pop();
}

/** Ask again after a failed reply. */
function retryReply(reply, ctx) {
  if (chat.active || !isReady()) {
    showError(isReady() ? 'Wait for the current reply to finish.' : 'The model is not ready yet.');
    return;
  }
  hideError();
  const settings = readSettings();
  const options = settings.options || ctx.options;
  if (chat.conversationId) {
    // The server has stored the failed reply as it ended; asking again is a new turn with the
    // same question, exactly as a reload of this conversation will show it.
    removeRetryButtons();
    ask(ctx.text, options);
    return;
  }
  // Private chat: drop the failed reply (and its partial text) and ask again with the same history.
  if (reply.inHistory) chat.history.pop();
  reply.el.remove();
  requestReply({ userEl: null, text: ctx.text, options });
}

/** Stop the reply that is streaming (the server keeps what it had). */
export function stop() {
  if (chat.active) chat.active.controller.abort();
  els.input.focus();
}

/** Clear the chat on screen (aborting a reply in progress: the server keeps what it had). */
function clearChat() {
  if (chat.active) {
    chat.active.controller.abort();
    chat.active = null;
  }
  chat.epoch += 1;
  chat.opening = false;
  chat.history = [];
  els.messages.replaceChildren();
  hideError();
}

/** Start an empty chat (stored or private as the Private switch says). */
export function newChat() {
  clearChat();
  chat.conversationId = null;
  chat.pendingRestore = null;
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
export async function openConversation(id, { restoring = false } = {}) {
  closeDrawer();
  if (!restoring && id === chat.conversationId && !chat.opening) return;
  clearChat();
  const epoch = chat.epoch;
  chat.conversationId = id;
  chat.private = false;
  chat.opening = true;
  markCurrent();
  updateEmptyState();
  updateControls();

  let result = null;
  try {
    result = await api('GET', `/api/conversations/${encodeURIComponent(id)}`);
  } catch (_) {
    result = null;
  }
  if (epoch !== chat.epoch) return; // the user moved on meanwhile
  chat.opening = false;

  if (result?.ok && result.data && Array.isArray(result.data.messages)) {
    chat.pendingRestore = null;
    remember(id);
    renderStoredConversation(result.data);
  } else {
    chat.conversationId = null;
    if (result?.status === 404) {
      // Deleted (here or elsewhere), or history is off: start fresh, silently on a reload.
      remember(null);
      chat.pendingRestore = null;
      removeConversation(id);
      if (result.data?.error?.code === 'history_disabled') setHistoryMode('off');
      if (!restoring) showError('That chat no longer exists.');
    } else if (result?.status === 401) {
      chat.pendingRestore = id; // reopened once the token is entered
      if (!restoring) {
        showError(apiFailure(result));
        askForAccessToken();
      }
    } else {
      chat.pendingRestore = id;
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
  for (const [position, message] of conversation.messages.entries()) {
    const content = typeof message.content === 'string' ? message.content : '';
    if (message.role === 'user') {
      const userEl = appendUserMessage(content);
      const stored = Array.isArray(message.meta?.images) ? message.meta.images : [];
      renderThumbnails(userEl, { stored, conversationId: conversation.id });
      chat.history.push({ role: 'user', content });
    } else if (message.role === 'assistant') {
      const reply = renderStoredReply(message, content, position);
      if (content && reply.el.dataset.finish !== 'error') keepInHistory(reply);
    }
    // System turns are context the page did not show when they were sent either.
  }
  updateEmptyState();
  scrollToBottom();
}

/** One of the welcome's examples: send it at once if the model is ready. */
export function useExample(button) {
  setInput(button.dataset.prompt || button.textContent.trim());
  if (isReady() && !chat.active) submit();
  else els.input.focus();
}

/** The Private switch was flipped: it applies only to an empty chat. */
export function onPrivateToggle() {
  if (historyMode() === 'off' || !chatIsEmpty() || chat.active) {
    updatePrivacy(); // not changeable now: show the real state again
    return;
  }
  chat.private = els.privateToggle.checked;
  if (chat.private && chat.conversationId) {
    // An empty stored chat (its first send was refused) becomes a private one.
    chat.conversationId = null;
    remember(null);
    markCurrent();
  }
  updatePrivacy();
  els.input.focus();
}

/* ------------------------------------------------------------------ */
/* Message actions: copy, edit and resend, regenerate, versions        */
/* ------------------------------------------------------------------ */

function lastAssistantEl() {
  const all = els.messages.querySelectorAll('[data-testid="message"][data-role="assistant"]');
  return all[all.length - 1] || null;
}

/** Edit and Regenerate only while nothing streams; Regenerate only on the last reply. */
function updateActions() {
  const busy = Boolean(chat.active) || chat.opening;
  const last = lastAssistantEl();
  for (const button of els.messages.querySelectorAll('[data-action="regenerate"]')) {
    const el = button.closest('[data-testid="message"]');
    button.hidden = el !== last || el.nextElementSibling !== null;
    button.disabled = busy || !isReady();
  }
  for (const button of els.messages.querySelectorAll('[data-action="edit"], [data-action="prev"], [data-action="next"]')) {
    if (busy) button.dataset.busy = 'true';
    else delete button.dataset.busy;
  }
}

/** A click on one of a message's action buttons. */
export function onMessageAction(button) {
  const el = button.closest('[data-testid="message"]');
  if (!el || button.disabled) return;
  const action = button.dataset.action;
  if (action === 'copy') copyMessage(button, el);
  else if (button.dataset.busy) showError('Wait for the current reply to finish.');
  else if (action === 'edit') startEdit(el);
  else if (action === 'regenerate') regenerate(el);
  else if (action === 'prev' || action === 'next') pageVersion(el, action === 'next' ? 1 : -1);
}

async function copyMessage(button, el) {
  if (!(await copyOrSelect(messageText(el), el.querySelector('.message-body')))) return;
  button.dataset.copied = 'true';
  button.title = 'Copied';
  button.setAttribute('aria-label', 'Copied');
  setTimeout(() => {
    delete button.dataset.copied;
    button.title = 'Copy';
    button.setAttribute('aria-label', 'Copy');
  }, 1500);
}

/** Edit an earlier question in place: Send truncates the chat there and asks again. */
function startEdit(el) {
  if (el.querySelector('.edit-box')) return;
  const body = el.querySelector('.message-body');
  const actions = el.querySelector('.message-actions');
  const box = document.createElement('div');
  box.className = 'edit-box';
  box.dataset.testid = 'edit-box';
  const area = document.createElement('textarea');
  area.className = 'edit-input';
  area.dataset.testid = 'edit-input';
  area.setAttribute('aria-label', 'Edit your message');
  area.rows = Math.min(10, Math.max(2, messageText(el).split('\n').length));
  area.value = messageText(el);
  const row = document.createElement('div');
  row.className = 'edit-buttons';
  const cancel = document.createElement('button');
  cancel.type = 'button';
  cancel.className = 'btn-small';
  cancel.dataset.testid = 'edit-cancel';
  cancel.textContent = 'Cancel';
  const send = document.createElement('button');
  send.type = 'button';
  send.className = 'btn-small btn-primary-small';
  send.dataset.testid = 'edit-send';
  send.textContent = 'Send';
  row.append(cancel, send);
  box.append(area, row);
  body.hidden = true;
  actions.hidden = true;
  el.append(box);
  area.focus();
  const close = () => {
    box.remove();
    body.hidden = false;
    actions.hidden = false;
  };
  cancel.addEventListener('click', close);
  const go = () => {
    const text = area.value.replace(/^\s*\n/, '').trimEnd();
    if (!text.trim()) return;
    close();
    resendEdited(el, text);
  };
  send.addEventListener('click', go);
  area.addEventListener('keydown', (event) => {
    if (event.key === 'Escape') {
      event.preventDefault();
      event.stopPropagation();
      close();
    } else if (event.key === 'Enter' && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
      event.preventDefault();
      go();
    }
  });
}

/** The edited question replaces the one at `el`; it and everything after it are dropped (on the
 *  server too: truncated from that message), then the edited question is asked. */
async function resendEdited(el, text) {
  if (chat.active || chat.opening || !isReady()) {
    showError(isReady() ? 'Wait for the current reply to finish.' : 'The model is not ready yet.');
    return;
  }
  const settings = readSettings();
  if (settings.error) {
    showError(settings.error);
    return;
  }
  hideError();
  const turn = [...els.messages.querySelectorAll('[data-role="user"]')].indexOf(el);
  const epoch = chat.epoch;
  if (chat.conversationId) {
    const id = chat.conversationId;
    const path = `/api/conversations/${encodeURIComponent(id)}`;
    let result = null;
    try {
      const stored = await api('GET', path);
      const positions = (stored.data?.messages || []).flatMap((m, i) => (m.role === 'user' ? [i] : []));
      result = stored.ok && turn < positions.length
        ? await api('POST', `${path}/truncate`, { from: positions[turn] })
        : stored;
    } catch (_) {
      result = null;
    }
    if (epoch !== chat.epoch) return;
    if (!result?.ok) {
      showError(result ? `Couldn’t edit that message: ${apiFailure(result)}` : 'Couldn’t edit that message: the server is unreachable.');
      return;
    }
  }
  let seen = -1;
  const cut = chat.history.findIndex((m) => m.role === 'user' && (seen += 1) === turn);
  if (cut >= 0) chat.history.length = cut;
  for (let node = el; node;) {
    const next = node.nextElementSibling;
    node.remove();
    node = next;
  }
  removeRetryButtons();
  ask(text, settings.options);
}

/** Ask again for the last reply. The old one is kept: the new one is another version of it, and
 *  the < 1/2 > pager goes back and forth (stored on the server for a stored chat). */
async function regenerate(el) {
  const old = replyOf(el);
  if (!old || chat.active || chat.opening || !isReady() || el !== lastAssistantEl()) return;
  const settings = readSettings();
  if (settings.error) {
    showError(settings.error);
    return;
  }
  hideError();
  removeRetryButtons();
  const versions = old.versions || [{
    content: old.text, status: old.el.dataset.finish || 'stop', meta: old.doneMeta || null,
  }];
  if (old.inHistory && chat.history[chat.history.length - 1] === old.entry) chat.history.pop();
  el.hidden = true;
  const epoch = chat.epoch;
  const conversationId = chat.conversationId;
  const reply = appendAssistantMessage();
  const controller = new AbortController();
  chat.active = { controller, reply };
  updateControls();
  scrollToBottom();
  // The whole conversation goes out, so the server stores nothing by itself: the page stores the
  // new version below, once it has ended (a regeneration the model never takes changes nothing).
  const outcome = await streamInto(reply, buildPayload(settings.options, null), controller.signal);
  if (epoch !== chat.epoch) return;
  chat.active = null;
  if (outcome.kind === 'rejected') {
    reply.el.remove();
    el.hidden = false;
    if (old.inHistory) chat.history.push(old.entry);
    showError(outcome.message);
    if (outcome.status === 401) askForAccessToken();
    if (outcome.status === undefined || outcome.status === 503) pollHealth();
    updateControls();
    return;
  }
  const finish = outcome.kind === 'done' ? outcome.event.finish_reason || 'stop' : (outcome.kind === 'cancelled' ? 'cancelled' : 'error');
  finishReply(reply, finish);
  const meta = outcome.kind === 'done' ? { usage: outcome.event.usage, timing: outcome.event.timing } : {};
  if (outcome.kind === 'error') meta.error = outcome.message;
  if (finish === 'cancelled') markStopped(reply);
  else if (outcome.kind === 'done') reply.meta.textContent = describeDone(outcome.event);
  else showReplyError(reply, outcome.message, null);
  reply.doneMeta = meta;
  reply.versions = [...versions, { content: reply.text, status: finish, meta }];
  reply.shown = reply.versions.length - 1;
  reply.position = old.position;
  el.remove();
  keepInHistory(reply);
  renderVersions(reply);
  updateControls();
  if (conversationId) {
    const result = await api('POST', `/api/conversations/${encodeURIComponent(conversationId)}/alternatives`,
      { content: reply.text, status: finish, meta }).catch(() => null);
    if (result?.ok && Array.isArray(result.data?.messages)) {
      reply.position = result.data.messages.length - 1;
      refreshList();
    } else if (epoch === chat.epoch) {
      showError(result ? `The new reply could not be saved: ${apiFailure(result)}` : 'The new reply could not be saved: the server is unreachable.');
    }
  }
}

/** Page through a regenerated reply's versions; the one shown is what the chat continues from. */
async function pageVersion(el, step) {
  const reply = replyOf(el);
  if (!reply?.versions) return;
  const index = reply.shown + step;
  if (index < 0 || index >= reply.versions.length) return;
  showVersion(reply, index);
  if (reply.entry) reply.entry.content = reply.text;
  else if (reply.text && el === lastAssistantEl()) keepInHistory(reply);
  updateControls();
  if (chat.conversationId && Number.isInteger(reply.position)) {
    const path = `/api/conversations/${encodeURIComponent(chat.conversationId)}/messages/${reply.position}`;
    const result = await api('PATCH', path, { shown: index }).catch(() => null);
    if (!result?.ok) showError(result ? `Couldn’t keep that choice: ${apiFailure(result)}` : 'Couldn’t keep that choice: the server is unreachable.');
  }
}

/** The chat on screen as an export: the server's for a stored chat, the page's own for a private one. */
export async function chatExport() {
  if (chat.conversationId) {
    const result = await api('GET', `/api/conversations/${encodeURIComponent(chat.conversationId)}/export`);
    if (!result.ok) throw new Error(apiFailure(result));
    return result.data;
  }
  const first = chat.history.find((m) => m.role === 'user');
  const title = first ? first.content.split(/\s+/).join(' ').slice(0, 60) : 'New chat';
  const messages = [];
  for (const el of els.messages.querySelectorAll('[data-testid="message"]')) {
    if (el.hidden) continue;
    const reply = replyOf(el);
    messages.push(reply
      ? { role: 'assistant', content: reply.text, status: el.dataset.finish || 'stop', meta: reply.doneMeta || null }
      : { role: 'user', content: messageText(el), status: 'complete', meta: null });
  }
  return { title, messages };
}

/** Something is on screen to export. */
export function hasChat() {
  return els.messages.childElementCount > 0 && !chat.active;
}
