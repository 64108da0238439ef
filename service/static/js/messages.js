/* One message of the transcript as DOM: the user's turn (plain text), the assistant's reply
 * (rendered Markdown, re-rendered at most once a frame while it streams), its meta line (tokens,
 * speed), the Stopped badge, the error marker with Retry, and each message's actions (Copy, Edit,
 * Regenerate, the < 1/2 > pager through a regenerated reply's versions). A reply is the object
 * {el, body, meta, actions, text, renderQueued, inHistory, entry, versions, shown, position}.
 * No chat state lives here. */

import { els } from './dom.js';
import { renderMarkdown } from './markdown.js';
import { followOutput } from './ui.js';

/** Append the user's turn, as plain text (the caller updates the empty state). */
export function appendUserMessage(text) {
  const el = document.createElement('div');
  el.className = 'message';
  el.dataset.testid = 'message';
  el.dataset.role = 'user';
  const body = document.createElement('div');
  body.className = 'message-body';
  body.dataset.testid = 'message-body';
  body.textContent = text; // user text is never HTML
  texts.set(el, text);
  el.append(body, actionBar([['copy', 'Copy'], ['edit', 'Edit']]));
  els.messages.append(el);
  return el;
}

const texts = new WeakMap();   // user message element -> its text
const replies = new WeakMap(); // assistant message element -> its reply object

/** The text of a message element (what Copy copies). */
export function messageText(el) {
  return replies.has(el) ? replies.get(el).text : (texts.get(el) ?? '');
}

/** The reply object of an assistant message element. */
export function replyOf(el) {
  return replies.get(el) || null;
}

const ICONS = {
  copy: 'M9 9h10v10H9zM5 15V5h10',
  edit: 'M4 20h4L19 9l-4-4L4 16zM13.5 6.5l4 4',
  regenerate: 'M20 11a8 8 0 1 0-2.3 5.7M20 5v6h-6',
  prev: 'M15 6l-6 6 6 6',
  next: 'M9 6l6 6-6 6',
};

function iconButton(action, label) {
  const button = document.createElement('button');
  button.type = 'button';
  button.className = 'action-btn';
  button.dataset.action = action;
  button.dataset.testid = `${action}-message`;
  button.setAttribute('aria-label', label);
  button.title = label;
  const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('class', 'icon');
  svg.setAttribute('aria-hidden', 'true');
  const path = document.createElementNS('http://www.w3.org/2000/svg', 'path');
  path.setAttribute('d', ICONS[action]);
  path.setAttribute('fill', 'none');
  path.setAttribute('stroke', 'currentColor');
  path.setAttribute('stroke-width', '1.8');
  path.setAttribute('stroke-linecap', 'round');
  path.setAttribute('stroke-linejoin', 'round');
  svg.append(path);
  button.append(svg);
  return button;
}

function actionBar(actions) {
  const bar = document.createElement('div');
  bar.className = 'message-actions';
  bar.dataset.testid = 'message-actions';
  for (const [action, label] of actions) bar.append(iconButton(action, label));
  return bar;
}

/** The < 2/3 > pager of a reply with several versions (none for a reply with one). */
export function renderVersions(reply) {
  reply.actions.querySelector('.versions')?.remove();
  const count = reply.versions?.length || 0;
  if (count < 2) return;
  const pager = document.createElement('span');
  pager.className = 'versions';
  pager.dataset.testid = 'versions';
  const label = document.createElement('span');
  label.className = 'versions-label';
  label.dataset.testid = 'versions-label';
  label.textContent = `${reply.shown + 1}/${count}`;
  const prev = iconButton('prev', 'Previous version');
  const next = iconButton('next', 'Next version');
  prev.disabled = reply.shown === 0;
  next.disabled = reply.shown === count - 1;
  pager.append(prev, label, next);
  reply.actions.prepend(pager);
}

/** Show version `index` of a reply: its text, how it ended and its numbers. */
export function showVersion(reply, index) {
  const version = reply.versions[index];
  reply.shown = index;
  reply.text = typeof version.content === 'string' ? version.content : '';
  reply.body.replaceChildren();
  reply.el.querySelector('.reply-error')?.remove();
  const status = String(version.status || 'stop');
  finishReply(reply, status);
  describeEnd(reply, status, version.meta && typeof version.meta === 'object' ? version.meta : {});
  renderVersions(reply);
}

/** The meta line (or Stopped badge, or error marker) of a stored or paged-to version. */
function describeEnd(reply, finish, meta) {
  if (finish === 'cancelled') {
    markStopped(reply);
  } else if (finish === 'error') {
    reply.meta.textContent = '';
    showReplyError(reply, meta.error ? `generation failed: ${meta.error}` : 'The model stopped with an error.', null);
  } else {
    reply.meta.textContent = describeDone({ usage: meta.usage, timing: meta.timing, finish_reason: finish });
  }
}

/** Append an empty assistant reply showing the typing dots; returns the reply object. */
export function appendAssistantMessage() {
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

  const actions = actionBar([['copy', 'Copy'], ['regenerate', 'Regenerate']]);
  actions.hidden = true; // until the reply has ended

  el.append(body, meta, actions);
  els.messages.append(el);
  const reply = {
    el, body, meta, actions, text: '', renderQueued: false, inHistory: false,
    entry: null, versions: null, shown: 0, position: null,
  };
  replies.set(el, reply);
  return reply;
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
  // The typing dots stay until there is something to see (a reply may start with blank lines).
  if (reply.text.trim()) renderMarkdown(reply.body, reply.text);
  followOutput();
}

// Re-rendering the whole reply on every token is wasteful; do it at most once per frame.
export function scheduleRender(reply) {
  if (reply.renderQueued) return;
  reply.renderQueued = true;
  requestAnimationFrame(() => {
    reply.renderQueued = false;
    if (reply.el.dataset.streaming === 'true') renderReply(reply);
  });
}

/** The reply has ended (`finish`: stop, length, cancelled, error): final render, no more dots. */
export function finishReply(reply, finish) {
  renderReply(reply);
  if (!reply.text.trim()) reply.body.replaceChildren();
  reply.el.dataset.streaming = 'false';
  reply.el.dataset.finish = finish;
  reply.el.removeAttribute('aria-busy');
  reply.actions.hidden = false;
}

/** The meta line of a finished reply: tokens, speed, first-token time, queueing, what was cut. */
export function describeDone(event) {
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

/** The Stopped badge in place of the meta line. */
export function markStopped(reply) {
  const badge = document.createElement('span');
  badge.className = 'meta-stopped';
  badge.textContent = 'Stopped';
  reply.meta.replaceChildren(badge);
}

/** The error marker under a reply; `retry` adds a Retry button (not on stored, older replies). */
export function showReplyError(reply, message, retry) {
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
export function removeRetryButtons() {
  for (const button of els.messages.querySelectorAll('.retry-btn')) button.remove();
}

/** A stored reply looks exactly like the live one did when it ended, with its versions if it
 *  was regenerated. `position`: its place in the stored conversation. */
export function renderStoredReply(message, content, position) {
  const reply = appendAssistantMessage();
  reply.text = content;
  reply.position = position;
  const finish = !message.status || message.status === 'complete' ? 'stop' : String(message.status);
  finishReply(reply, finish);
  const meta = message.meta && typeof message.meta === 'object' ? message.meta : {};
  describeEnd(reply, finish, meta);
  const versions = Array.isArray(meta.alternatives)
    ? meta.alternatives.filter((v) => v && typeof v === 'object' && typeof v.content === 'string')
    : [];
  if (versions.length > 1) {
    reply.versions = versions;
    const shown = Number.isInteger(meta.shown) ? meta.shown : versions.length - 1;
    reply.shown = Math.min(Math.max(shown, 0), versions.length - 1);
    renderVersions(reply);
  }
  return reply;
}

