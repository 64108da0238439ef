/* The Settings panel: opening and closing it, reading what it holds for the next message (system
 * prompt, max tokens, temperature), and sending the user to its access-token field. The token's
 * storage and use are in api.js. */

import { els } from './dom.js';
import { closeDrawer } from './sidebar.js';

function setSettingsOpen(open) {
  els.settings.hidden = !open;
  els.settingsToggle.setAttribute('aria-expanded', String(open));
}

function openSettings() {
  closeDrawer();
  setSettingsOpen(true);
}

/** The panel is open. */
export function settingsOpen() {
  return !els.settings.hidden;
}

/** Close the panel (Escape), giving the focus back to its button. */
export function closeSettings() {
  setSettingsOpen(false);
  els.settingsToggle.focus();
}

export function toggleSettings() {
  const open = els.settings.hidden;
  setSettingsOpen(open);
  if (open) els.systemPrompt.focus();
}

/** The server refused for want of a token: show where to enter it. */
export function askForAccessToken() {
  openSettings();
  els.accessToken.focus();
}

/** The system prompt for the next message ('' for none). */
export function systemPrompt() {
  return els.systemPrompt.value.trim();
}

let maxTokensCap = null; // half the model's context: the rest is left for the conversation

/** The model's context is known (GET /api/health): Max tokens may use at most half of it, so a
 *  reply can never claim the room the question needs. */
export function capMaxTokens(contextLength) {
  if (!Number.isInteger(contextLength) || contextLength < 2) return;
  maxTokensCap = Math.floor(contextLength / 2);
  els.maxTokens.max = String(maxTokensCap);
  els.maxTokensHint.textContent = `at most ${maxTokensCap} for this model (its context holds ${contextLength} tokens)`;
  els.maxTokensHint.hidden = false;
  const current = Number(els.maxTokens.value);
  if (Number.isFinite(current) && current > maxTokensCap) els.maxTokens.value = String(maxTokensCap);
}

/** Read the sampling settings; returns {options} or {error}. */
export function readSettings() {
  const options = {};
  const maxRaw = els.maxTokens.value.trim();
  if (maxRaw !== '') {
    const max = Number(maxRaw);
    if (!Number.isInteger(max) || max < 1) {
      return { error: '“Max tokens” must be a whole number of at least 1 (see Settings).' };
    }
    if (maxTokensCap && max > maxTokensCap) {
      return { error: `“Max tokens” can be at most ${maxTokensCap} for this model: the rest of its context is for the conversation (see Settings).` };
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
