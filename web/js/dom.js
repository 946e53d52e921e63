// Small DOM and formatting helpers. Text from the network only ever becomes
// text nodes (never HTML), so no message can inject markup or script.

import { LANG, t } from './i18n.js';

/** Creates an element: `h('button', {class: 'x', onclick: f}, 'label', child)`. */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k === 'value') el.value = v;
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c == null || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

/** Replaces all children of `el`. */
export function setChildren(el, ...children) {
  el.replaceChildren(...children.flat(Infinity).filter((c) => c != null && c !== false));
}

let uniq = 0;
/** A fresh element id. */
export function newId(prefix) {
  uniq += 1;
  return `${prefix}-${uniq}`;
}

/** A random id for `client_id` and `idempotency_key` (works outside secure contexts too). */
export function randomId() {
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}

const timeFmt = new Intl.DateTimeFormat(LANG, { hour: '2-digit', minute: '2-digit' });
const dateFmt = new Intl.DateTimeFormat(LANG, { year: 'numeric', month: 'short', day: 'numeric' });
const weekdayFmt = new Intl.DateTimeFormat(LANG, { weekday: 'long' });
const shortDateFmt = new Intl.DateTimeFormat(LANG, { month: 'numeric', day: 'numeric' });
const fullFmt = new Intl.DateTimeFormat(LANG, { dateStyle: 'full', timeStyle: 'short' });

function dayStart(ts) {
  const d = new Date(ts);
  d.setHours(0, 0, 0, 0);
  return d.getTime();
}

/** Whole days between the day of `ts` and today (0 = today). */
export function daysAgo(ts) {
  return Math.round((dayStart(Date.now()) - dayStart(ts)) / 86400000);
}

export const fmtTime = (ts) => timeFmt.format(ts);
export const fmtFull = (ts) => fullFmt.format(ts);

/** A day separator label: Today, Yesterday, a weekday within a week, else the date. */
export function fmtDay(ts) {
  const n = daysAgo(ts);
  if (n === 0) return t('today');
  if (n === 1) return t('yesterday');
  if (n > 1 && n < 7) return weekdayFmt.format(ts);
  return dateFmt.format(ts);
}

/** The time shown in the chat list: a time today, "Yesterday", else a short date. */
export function fmtListTime(ts) {
  const n = daysAgo(ts);
  if (n === 0) return timeFmt.format(ts);
  if (n === 1) return t('yesterday');
  return shortDateFmt.format(ts);
}

export function fmtLastSeen(ts) {
  const n = daysAgo(ts);
  if (n === 0) return t('last_seen_today', { time: timeFmt.format(ts) });
  if (n === 1) return t('last_seen_yesterday', { time: timeFmt.format(ts) });
  return t('last_seen_on', { date: dateFmt.format(ts) });
}

/** Money in minor units (KRW has none; USD has cents) as a localized string. */
export function fmtMoney(minor, currency) {
  try {
    const f = new Intl.NumberFormat(LANG, { style: 'currency', currency });
    const digits = f.resolvedOptions().maximumFractionDigits;
    return f.format(Number(minor) / 10 ** digits);
  } catch {
    return `${minor} ${currency}`;
  }
}

/** Parses an amount typed in major units into minor units; null if invalid. */
export function parseMoney(text, currency) {
  let digits = 0;
  try {
    digits = new Intl.NumberFormat('en', { style: 'currency', currency }).resolvedOptions()
      .maximumFractionDigits;
  } catch {
    digits = 0;
  }
  const s = String(text).trim().replaceAll(',', '');
  const re = digits > 0 ? new RegExp(`^\\d+(\\.\\d{1,${digits}})?$`) : /^\d+$/;
  if (!re.test(s)) return null;
  const [whole, frac = ''] = s.split('.');
  const minor = BigInt(whole) * 10n ** BigInt(digits) + BigInt((frac + '0'.repeat(digits)).slice(0, digits) || '0');
  if (minor <= 0n || minor > BigInt(Number.MAX_SAFE_INTEGER)) return null;
  return Number(minor);
}

/** A round avatar with the initials of `name`, coloured by `id`. */
export function avatar(name, id, extraClass) {
  const letters = Array.from(String(name || '?').trim()).slice(0, 1).join('').toUpperCase() || '?';
  let hash = 0;
  for (const ch of String(id)) hash = (hash * 31 + ch.charCodeAt(0)) >>> 0;
  return h('span', { class: `avatar c${hash % 8} ${extraClass || ''}`, 'aria-hidden': 'true' }, letters);
}

/** Number of Unicode characters (what the server's `max_text_chars` counts). */
export function charCount(s) {
  let n = 0;
  for (const _ of s) n += 1;
  return n;
}

/**
 * Appends `text` to `el` with every case-insensitive occurrence of one of
 * `terms` wrapped in <mark>. Text nodes only.
 */
export function appendHighlighted(el, text, terms) {
  const words = terms.filter((w) => w.length > 0).map((w) => w.toLowerCase());
  if (words.length === 0) {
    el.append(text);
    return;
  }
  const lower = text.toLowerCase();
  let i = 0;
  while (i < text.length) {
    let best = -1;
    let bestLen = 0;
    for (const w of words) {
      const at = lower.indexOf(w, i);
      if (at >= 0 && (best < 0 || at < best || (at === best && w.length > bestLen))) {
        best = at;
        bestLen = w.length;
      }
    }
    if (best < 0) break;
    if (best > i) el.append(text.slice(i, best));
    el.append(h('mark', null, text.slice(best, best + bestLen)));
    i = best + bestLen;
  }
  if (i < text.length) el.append(text.slice(i));
}

/**
 * Appends `text` to `el` with the `[start, end)` character ranges (Unicode
 * characters, as the search API gives them) wrapped in <mark>.
 */
export function appendRanges(el, text, ranges) {
  const chars = Array.from(text);
  let at = 0;
  for (const [start, end] of ranges) {
    if (start < at || end > chars.length || start >= end) continue;
    if (start > at) el.append(chars.slice(at, start).join(''));
    el.append(h('mark', null, chars.slice(start, end).join('')));
    at = end;
  }
  if (at < chars.length) el.append(chars.slice(at).join(''));
}

/** Debounces `fn` by `ms`. */
export function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}
