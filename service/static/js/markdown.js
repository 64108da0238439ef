/* Markdown rendering of model output, which is untrusted: marked (vendor/marked.min.js, a classic
 * script loaded before the modules) renders it with raw HTML escaped, no images and no form
 * controls, and DOMPurify (vendor/purify.min.js) sanitises the result before it touches the DOM;
 * links keep only http(s) and mailto. Code blocks get a language label and a Copy button.
 * Without either library the text is shown as plain text. */

import { copyOrSelect } from './ui.js';

// The vendored libraries are UMD builds that set these globals (see vendor/README.md).
const { marked, DOMPurify } = globalThis;

const SAFE_LINK = /^(https?:|mailto:)/i;

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
export function renderMarkdown(target, text) {
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

/** Copy the code of the block `button` belongs to (or select it when there is no clipboard). */
export async function copyCode(button) {
  const pre = button.closest('.code-block')?.querySelector('pre');
  if (!pre) return;
  if (!(await copyOrSelect(pre.textContent, pre))) return;
  button.textContent = 'Copied';
  setTimeout(() => { button.textContent = 'Copy'; }, 1500);
}

