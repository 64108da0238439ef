/* Page-wide pieces several modules share: the error banner, the message box (its text and its
 * auto-growing height), and keeping the newest output in view while the user has not scrolled up. */

import { els } from './dom.js';

const STICK_TO_BOTTOM_PX = 48;

let stickToBottom = true; // the view follows new output until the user scrolls up

export function showError(message) {
  els.errorText.textContent = message;
  els.error.hidden = false;
}

export function hideError() {
  els.error.hidden = true;
  els.errorText.textContent = '';
}

function distanceFromBottom() {
  const s = els.scroller;
  return s.scrollHeight - s.scrollTop - s.clientHeight;
}

export function scrollToBottom() {
  els.scroller.scrollTop = els.scroller.scrollHeight;
  stickToBottom = true;
  els.jump.hidden = true;
}

export function followOutput() {
  if (stickToBottom) scrollToBottom();
  else els.jump.hidden = false;
}

export function onScroll() {
  stickToBottom = distanceFromBottom() < STICK_TO_BOTTOM_PX;
  if (stickToBottom) els.jump.hidden = true;
}

export function setInput(text) {
  els.input.value = text;
  syncInputHeight();
}

// The grow-wrap's ::after mirrors the text, which sizes the textarea (see style.css).
export function syncInputHeight() {
  els.growWrap.dataset.replicatedValue = els.input.value;
}

/** Put `text` back in the message box (before anything typed meanwhile) for editing or resending. */
export function restoreInput(text) {
  const current = els.input.value;
  setInput(current.trim() ? `${text}\n${current}` : text);
  els.input.focus();
}

/** Copy `text` to the clipboard; without one (plain http on a LAN address) select `node` instead, so
 * Ctrl+C copies it. True when the clipboard took it. */
export async function copyOrSelect(text, node) {
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return true;
    }
  } catch (_) {
    // refused (no permission, page not focused): fall back to a selection
  }
  const range = document.createRange();
  range.selectNodeContents(node);
  const selection = window.getSelection();
  selection.removeAllRanges();
  selection.addRange(range);
  return false;
}
