/* Export and import in the page: the chat on screen as a Markdown or JSON download (made here from
 * the export, so a private chat exports the same way as a stored one), and an exported JSON file
 * read back as a new stored conversation (POST /api/conversations/import). */

import { els } from './dom.js';
import { api, apiFailure } from './api.js';
import { chatExport, hasChat, openConversation } from './chat.js';
import { addConversation, historyMode } from './sidebar.js';
import { hideError, showError } from './ui.js';

const ROLE_NAMES = { user: 'You', assistant: 'Assistant', system: 'System' };

/** An export as Markdown: the title, then each message under who said it. */
export function toMarkdown(conversation) {
  const lines = [`# ${conversation.title || 'Chat'}`, ''];
  if (conversation.model) lines.push(`Model: ${conversation.model}`, '');
  for (const m of conversation.messages || []) {
    lines.push(`## ${ROLE_NAMES[m.role] || m.role}`, '');
    lines.push(m.content ? m.content : '*(no text)*', '');
    if (m.role === 'assistant' && m.status && !['stop', 'complete'].includes(m.status)) {
      lines.push(`*(${m.status === 'length' ? 'cut at max tokens' : m.status})*`, '');
    }
  }
  return `${lines.join('\n').trimEnd()}\n`;
}

function fileName(conversation, ext) {
  const base = String(conversation.title || 'chat').toLowerCase().replace(/[^a-z0-9]+/g, '-')
    .replace(/^-|-$/g, '').slice(0, 50);
  return `${base || 'chat'}.${ext}`;
}

function download(name, type, text) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const link = document.createElement('a');
  link.href = url;
  link.download = name;
  link.hidden = true;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

async function exportAs(kind) {
  els.chatMenu.open = false;
  if (!hasChat()) {
    showError('There is nothing to export yet: this chat is empty.');
    return;
  }
  let conversation;
  try {
    conversation = await chatExport();
  } catch (err) {
    showError(`Couldn’t export this chat: ${err.message || 'the server is unreachable.'}`);
    return;
  }
  hideError();
  if (kind === 'markdown') download(fileName(conversation, 'md'), 'text/markdown', toMarkdown(conversation));
  else download(fileName(conversation, 'json'), 'application/json', `${JSON.stringify(conversation, null, 2)}\n`);
}

async function importFile() {
  const file = els.importFile.files?.[0];
  els.importFile.value = '';
  if (!file) return;
  let data;
  try {
    data = JSON.parse(await file.text());
  } catch (_) {
    showError(`Couldn’t import “${file.name}”: it is not JSON. Choose a file this page exported as JSON.`);
    return;
  }
  let result = null;
  try {
    result = await api('POST', '/api/conversations/import', data);
  } catch (_) {
    result = null;
  }
  if (!result?.ok || typeof result.data?.id !== 'string') {
    const why = !result ? 'the server is unreachable.' : (result.status === 413
      ? 'the file is larger than this server accepts.' : apiFailure(result));
    showError(`Couldn’t import “${file.name}”: ${why}`);
    return;
  }
  hideError();
  addConversation(result.data);
  openConversation(result.data.id);
}

function chooseImport() {
  els.chatMenu.open = false;
  if (historyMode() === 'off') {
    showError('History is off on this server, so an imported chat has nowhere to be kept.');
    return;
  }
  els.importFile.click();
}

export function initTransfer() {
  els.exportMarkdown.addEventListener('click', () => exportAs('markdown'));
  els.exportJson.addEventListener('click', () => exportAs('json'));
  els.importJson.addEventListener('click', chooseImport);
  els.importFile.addEventListener('change', importFile);
}
