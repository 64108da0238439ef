/* One message of the transcript as DOM: the user's turn (plain text), the assistant's reply
 * (rendered Markdown, re-rendered at most once a frame while it streams), its meta line (tokens,
 * speed), the Stopped badge and the error marker with Retry. A reply is the object
 * {el, body, meta, text, renderQueued, inHistory}. No chat state lives here. */

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
  el.append(body);
  els.messages.append(el);
  return el;
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

  el.append(body, meta);
  els.messages.append(el);
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
  if (!reply.text) reply.body.replaceChildren();
  reply.el.dataset.streaming = 'false';
  reply.el.dataset.finish = finish;
  reply.el.removeAttribute('aria-busy');
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

/** A stored reply looks exactly like the live one did when it ended. */
export function renderStoredReply(message, content) {
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

