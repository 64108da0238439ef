/* The sidebar: the list of stored conversations (paged, searchable, grouped by day) with rename
 * and delete, its notes (history off, needs a token, empty, failed), the history mode the server
 * is in, and the drawer it becomes at phone width. Titles are user/model text: they only ever go
 * through textContent. Owns the list's state; chat.js owns the chat on screen. */

import { els } from './dom.js';
import { api, apiFailure } from './api.js';
import {
  allowStoring, continuePrivately, currentConversationId, forgetConversation, newChat,
  openConversation, restoreLastChat, updateControls,
} from './chat.js';
import { showError } from './ui.js';

const PAGE_SIZE = 30;
const SEARCH_DEBOUNCE_MS = 250;
const TITLE_MAX = 200;

let mode = 'unknown';       // unknown | on | off (server keeps nothing) | auth (needs token) | error
let started = false;        // the sidebar has been loaded once
const side = {
  items: [],                // conversations shown, newest first
  next: null,               // cursor for "Load more"
  pages: 0,
  query: '',
  seq: 0,                   // newest list request; older answers are dropped
  loading: false,
  editingId: null,          // an item being renamed: the list is not rebuilt under it
  dirty: false,
  searchTimer: 0,
};
const nodes = new Map();    // conversation id -> its <li>

/** unknown | on | off | auth | error: whether (and how far) the server keeps conversations. */
export function historyMode() {
  return mode;
}

/** The server's answer about stored chats changed; the chat on screen and the list follow. */
export function setHistoryMode(next) {
  const was = mode;
  mode = next;
  if (mode === 'off' && was !== 'off') {
    // Nothing can be stored: the chat on screen continues as a private one.
    continuePrivately();
    side.items = [];
    side.next = null;
  } else if (was === 'off' && mode !== 'off') {
    allowStoring(); // if it is still empty
  }
  renderSidebar();
  updateControls();
}

/**
 * The sidebar starts once health has said whether the server keeps history (so a server with
 * HISTORY=off is never asked for conversations), or at once if health cannot say yet (model
 * still loading): the conversations API answers without the model.
 */
export function startHistory() {
  if (started) return;
  started = true;
  loadList();
  restoreLastChat();
}

export function historyFromHealth(enabled) {
  if (!enabled) {
    if (mode !== 'off') setHistoryMode('off');
  } else if (!started) {
    startHistory();
  } else if (mode === 'off' || mode === 'error') {
    loadList();
  }
}

/** The server is back: load the list if it could not be loaded before. */
export function historyAfterOutage() {
  if (started && (mode === 'error' || mode === 'unknown')) loadList();
}

/** A new access token may open the list the server refused. */
export function historyAfterToken() {
  if (started && mode !== 'off') loadList();
}

/** Load the first page of the list (for the current search), or the next one (`more`). */
async function loadList({ more = false, merge = false } = {}) {
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
  if (mode !== 'on') setHistoryMode('on');
  else renderSidebar();
}

/** After a reply: titles and order change on the server (a new chat is named after its question). */
export function refreshList() {
  if (mode === 'on') loadList({ merge: true });
}

/** A conversation was just created here: show it at the top at once. */
export function addConversation(conversation) {
  side.items = [conversation, ...side.items.filter((c) => c.id !== conversation.id)];
  if (!side.pages) side.pages = 1;
  if (mode !== 'on') setHistoryMode('on');
  else renderSidebar();
}

/** A conversation is gone (deleted here or elsewhere). */
export function removeConversation(id) {
  side.items = side.items.filter((c) => c.id !== id);
  renderSidebar();
}

function onSearchInput() {
  clearTimeout(side.searchTimer);
  side.searchTimer = setTimeout(() => {
    const query = els.search.value.trim();
    if (query === side.query) return;
    side.query = query;
    side.next = null;
    loadList();
  }, SEARCH_DEBOUNCE_MS);
}

export function renderSidebar() {
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
  side.dirty = false;
  const items = mode === 'on' ? side.items : [];
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
    let node = nodes.get(conversation.id);
    if (!node) {
      node = conversationItem(conversation.id);
      nodes.set(conversation.id, node);
    }
    setItemTitle(node, conversation.title);
    keep.add(conversation.id);
    children.push(node);
  }
  for (const id of [...nodes.keys()]) {
    if (!keep.has(id)) nodes.delete(id);
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

/** Highlight the conversation on screen. */
export function markCurrent() {
  for (const [id, li] of nodes) {
    const current = id === currentConversationId();
    li.classList.toggle('is-current', current);
    const open = li.querySelector('.conversation-open');
    if (current) open.setAttribute('aria-current', 'page');
    else open.removeAttribute('aria-current');
  }
}

function itemData(id) {
  return side.items.find((c) => c.id === id);
}

function startRename(li) {
  const editing = side.editingId;
  if (editing) {
    const other = nodes.get(editing);
    if (other) finishRename(other, true);
  }
  for (const node of nodes.values()) cancelDelete(node);
  const edit = renameField(li);
  edit.value = itemData(li.dataset.id)?.title || li.querySelector('.conversation-title').textContent;
  side.editingId = li.dataset.id;
  li.classList.add('is-editing');
  li.querySelector('.conversation-row').hidden = true;
  li.append(edit);
  edit.focus();
  edit.select();
}

async function finishRename(li, save) {
  const id = li.dataset.id;
  const edit = li.querySelector('.conversation-title-input');
  if (side.editingId !== id || !edit) return;
  const title = edit.value.replace(/\s+/g, ' ').trim();
  const before = itemData(id)?.title;
  const hadFocus = document.activeElement === edit;
  side.editingId = null;
  li.classList.remove('is-editing');
  edit.remove(); // its blur event finds editingId cleared and does nothing
  li.querySelector('.conversation-row').hidden = false;
  if (side.dirty) renderList();
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
  if (side.editingId) {
    const other = nodes.get(side.editingId);
    if (other) finishRename(other, true);
  }
  for (const other of nodes.values()) if (other !== li) cancelDelete(other);
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
    if (id === currentConversationId()) newChat();
    forgetConversation(id);
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

export function closeDrawer() {
  if (!els.app.classList.contains('drawer-open')) return;
  const hadFocus = els.sidebar.contains(document.activeElement);
  els.app.classList.remove('drawer-open');
  els.sidebarToggle.setAttribute('aria-expanded', 'false');
  els.backdrop.hidden = true;
  if (hadFocus) els.sidebarToggle.focus();
}


/** Wire the sidebar's own controls: drawer, search, Load more, Retry. */
export function initSidebar() {
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
}
