/* Images attached to the next question: the attach button, paste and drag-and-drop, the thumbnails
 * before sending (each with a remove button), the thumbnails in the transcript, and the notice when
 * the active model cannot see images, with the offer to switch to one that can.
 *
 * Images are read in the page as data: URLs (the Content-Security-Policy allows data: images and
 * nothing remote) and sent as they are; the server checks and scales them. A file's name is never
 * shown as HTML: thumbnails are <img> elements with a data: src and a plain-text alt. */

import { els } from './dom.js';
import { fetchBlob } from './api.js';
import { shortModelName } from './models.js';

export const IMAGE_TYPES = ['image/png', 'image/jpeg', 'image/webp', 'image/gif'];

const state = {
  pending: [],      // [{name, dataUrl}]
  models: [],       // the model menu, as /api/models gives it
  active: null,
  limits: null,     // {max_images, max_bytes} from /api/models, once known
};

/** Listen for the attach button, the file picker, paste and drops; and for the model menu. */
export function initAttachments() {
  els.attach.addEventListener('click', () => els.attachFile.click());
  els.attachFile.addEventListener('change', () => {
    addFiles(els.attachFile.files);
    els.attachFile.value = '';
  });
  els.input.addEventListener('paste', (event) => {
    const files = [...(event.clipboardData?.files || [])].filter((f) => IMAGE_TYPES.includes(f.type));
    if (files.length) {
      event.preventDefault();
      addFiles(files);
    }
  });
  const area = els.composerArea;
  area.addEventListener('dragover', (event) => {
    if (![...(event.dataTransfer?.types || [])].includes('Files')) return;
    event.preventDefault();
    area.classList.add('dropping');
  });
  area.addEventListener('dragleave', () => area.classList.remove('dropping'));
  area.addEventListener('drop', (event) => {
    area.classList.remove('dropping');
    if (!event.dataTransfer?.files?.length) return;
    event.preventDefault();
    addFiles(event.dataTransfer.files);
  });
  els.visionSwitch.addEventListener('click', () => {
    const id = els.visionSwitch.dataset.model;
    if (!id) return;
    els.modelSelect.value = id;
    els.modelSelect.dispatchEvent(new Event('change'));
  });
  document.addEventListener('models-changed', (event) => {
    state.models = event.detail.list || [];
    state.active = event.detail.active;
    state.limits = event.detail.limits || state.limits;
    renderNotice();
  });
}

/** Add image files to the next question (others are named in an error and left out). */
export async function addFiles(fileList) {
  const files = [...fileList];
  const refused = files.filter((f) => !IMAGE_TYPES.includes(f.type));
  const max = state.limits?.max_images ?? 4;
  const maxBytes = state.limits?.max_bytes ?? Infinity;
  for (const file of files) {
    if (!IMAGE_TYPES.includes(file.type)) continue;
    if (state.pending.length >= max) {
      showAttachError(`At most ${max} images per message.`);
      break;
    }
    if (file.size > maxBytes) {
      showAttachError(`${file.name || 'The image'} is larger than ${maxBytes} bytes.`);
      continue;
    }
    const dataUrl = await readAsDataUrl(file);
    state.pending.push({ name: file.name || 'image', dataUrl });
  }
  if (refused.length) showAttachError('Only PNG, JPEG, WebP and GIF images can be attached.');
  renderPending();
}

function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

function showAttachError(text) {
  els.attachError.textContent = text; // plain text: a file name is not HTML
  els.attachError.hidden = false;
}

/** Whether images wait to be sent. */
export function hasPending() {
  return state.pending.length > 0;
}

/** The waiting images as data: URLs, cleared from the composer. */
export function takePending() {
  const urls = state.pending.map((p) => p.dataUrl);
  state.pending = [];
  renderPending();
  return urls;
}

/** Put a refused send's images back in the composer, before any attached since (the send took
 *  them out), so the user can remove one, switch model, and send again. */
export function restorePending(urls) {
  if (!urls.length) return;
  const back = urls.map((dataUrl) => ({ name: 'image', dataUrl }));
  state.pending = [...back, ...state.pending];
  renderPending();
}

function renderPending() {
  const box = els.attachments;
  box.replaceChildren();
  state.pending.forEach((p, index) => {
    const item = document.createElement('div');
    item.className = 'attachment';
    item.dataset.testid = 'attachment';
    const img = thumbnail(p.dataUrl, p.name);
    const remove = document.createElement('button');
    remove.type = 'button';
    remove.className = 'attachment-remove';
    remove.dataset.testid = 'attachment-remove';
    remove.setAttribute('aria-label', `Remove ${p.name}`);
    remove.textContent = '×';
    remove.addEventListener('click', () => {
      state.pending.splice(index, 1);
      renderPending();
    });
    item.append(img, remove);
    box.append(item);
  });
  box.hidden = state.pending.length === 0;
  if (!state.pending.length) els.attachError.hidden = true;
  renderNotice();
  els.input.dispatchEvent(new Event('input')); // the Send button may be enabled by an image alone
}

function thumbnail(src, alt) {
  const img = document.createElement('img');
  img.className = 'thumbnail';
  img.dataset.testid = 'thumbnail';
  img.alt = alt;
  img.src = src;
  return img;
}

/** Thumbnails for a user message in the transcript: data: URLs, or stored images fetched with the
 *  access token (an <img> request would carry none). */
export function renderThumbnails(el, { urls = [], stored = [], conversationId = null } = {}) {
  if (!urls.length && !stored.length) return;
  const row = document.createElement('div');
  row.className = 'message-images';
  for (const url of urls) row.append(thumbnail(url, 'attached image'));
  for (const ref of stored) {
    const img = thumbnail('', 'attached image');
    row.append(img);
    const id = typeof ref?.id === 'string' ? ref.id : '';
    if (!/^[0-9a-f]{64}$/.test(id) || !conversationId) continue;
    fetchBlob(`/api/conversations/${encodeURIComponent(conversationId)}/images/${id}`)
      .then((blob) => (blob ? readAsDataUrl(blob) : ''))
      .then((src) => { if (src) img.src = src; })
      .catch(() => {});
  }
  el.prepend(row);
}

/** The notice under the transcript: images wait, and the active model cannot see them. */
function renderNotice() {
  const active = state.models.find((m) => m.id === state.active);
  const blind = active && active.accepts_images === false;
  const show = Boolean(blind && state.pending.length);
  els.visionNotice.hidden = !show;
  if (!show) return;
  const seeing = state.models.find((m) => m.accepts_images);
  els.visionNoticeText.textContent = seeing
    ? `${shortModelName(active.id)} cannot see images.`
    : `${shortModelName(active.id)} cannot see images, and no model offered here can.`;
  els.visionSwitch.hidden = !seeing;
  if (seeing) {
    els.visionSwitch.dataset.model = seeing.id;
    els.visionSwitch.textContent = `Switch to ${shortModelName(seeing.id)}`;
  }
}
