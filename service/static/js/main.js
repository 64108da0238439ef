/* Start-up: the page's only module script (index.html loads it after the vendored marked and
 * DOMPurify). It wires the controls that belong to no one module, the keyboard shortcuts and the
 * access-token field, then starts polling health (which starts the sidebar) and the model menu.
 *
 * The page talks only to this origin:
 *   GET  /api/health                 model state (and whether history is on), polled   health.js
 *   POST /api/chat                   {"messages": [...], "stream": true, ...} -> SSE   chat.js
 *   /api/conversations[/ID]          the sidebar: list, search, create, read, rename, delete  sidebar.js
 *   GET  /api/models, POST /api/models/active   the model dropdown                    models.js
 *   /api/conversations/ID/truncate|alternatives|messages/N   edit, regenerate, versions chat.js
 *   GET  /api/conversations/ID/export, POST /api/conversations/import   export, import transfer.js
 *
 * CSP-ready: no inline scripts or handlers, no eval, and no element.style writes (visibility is
 * toggled with the `hidden` attribute, looks with classes). Model output is untrusted: see
 * markdown.js. */

import { els } from './dom.js';
import { loadAccessToken, watchAccessToken } from './api.js';
import {
  isStreaming, newChat, onMessageAction, onPrivateToggle, reopenAfterToken, stop, submit, updateControls,
  updateEmptyState, useExample,
} from './chat.js';
import { pollHealth } from './health.js';
import { copyCode } from './markdown.js';
import { chooseModel, loadModels, modelsAfterToken } from './models.js';
import { initAttachments } from './attach.js';
import { closeSettings, settingsOpen, toggleSettings } from './settings.js';
import { closeDrawer, historyAfterToken, initSidebar, renderSidebar } from './sidebar.js';
import { initTransfer } from './transfer.js';
import { hideError, onScroll, scrollToBottom, syncInputHeight } from './ui.js';

function onInputKeydown(event) {
  // keyCode 229: some browsers report IME composition this way instead of isComposing.
  if (event.key !== 'Enter' || event.shiftKey || event.isComposing || event.keyCode === 229) return;
  event.preventDefault();
  submit();
}

function onGlobalKeydown(event) {
  if (event.key !== 'Escape' || event.isComposing) return;
  if (els.chatMenu.open) {
    event.preventDefault();
    els.chatMenu.open = false;
    els.chatMenu.querySelector('summary').focus();
  } else if (settingsOpen()) {
    event.preventDefault();
    closeSettings();
  } else if (els.app.classList.contains('drawer-open')) {
    event.preventDefault();
    closeDrawer();
  } else if (isStreaming()) {
    event.preventDefault();
    stop();
  }
}

/** A new token may open the conversations and models the server refused before. */
function onTokenChanged() {
  historyAfterToken();
  reopenAfterToken();
  modelsAfterToken();
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
  watchAccessToken(onTokenChanged);
  els.jump.addEventListener('click', scrollToBottom);
  els.scroller.addEventListener('scroll', onScroll, { passive: true });
  els.privateToggle.addEventListener('change', onPrivateToggle);
  initSidebar();
  els.modelSelect.addEventListener('change', chooseModel);
  document.addEventListener('keydown', onGlobalKeydown);

  els.welcome.addEventListener('click', (event) => {
    const button = event.target.closest('.example');
    if (button) useExample(button);
  });
  els.messages.addEventListener('click', (event) => {
    const button = event.target.closest('.copy-btn');
    if (button) copyCode(button);
    const action = event.target.closest('.action-btn');
    if (action) onMessageAction(action);
  });
  document.addEventListener('click', (event) => {
    if (els.chatMenu.open && !els.chatMenu.contains(event.target)) els.chatMenu.open = false;
  });
  initTransfer();
  initAttachments();
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
