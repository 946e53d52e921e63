// The live status page: one WebSocket (/api/v1/status/ws) sends the last 15
// minutes, then a sample every second; figures and canvas charts redraw.
// No libraries: charts are drawn on <canvas> here.

const MAX = 900;
const samples = [];
const $ = (id) => document.getElementById(id);

const CHARTS = [
  { title: 'Messages per second', series: [['msgs_in', 'in', '--c1'], ['msgs_out', 'delivered', '--c2']] },
  { title: 'Send → deliver latency (ms)', series: [['p50_ms', 'p50', '--c1'], ['p99_ms', 'p99', '--c3']] },
  { title: 'Connections', series: [['connections', 'TCP', '--c2'], ['sessions', 'sessions', '--c1']] },
  { title: 'Group commit', series: [['batch_avg', 'ops per batch', '--c1'], ['commit_ms_avg', 'commit ms', '--c4']] },
  { title: 'CPU (%)', series: [['cpu_percent', 'CPU', '--c4']] },
  { title: 'Memory (MB)', series: [['rss_mb', 'resident', '--c2']] },
  { title: 'Errors and requests per second', series: [['errors', 'errors', '--c3'], ['http_requests', 'HTTP requests', '--c2']] },
  { title: 'Search index lag', series: [['search_lag_messages', 'messages', '--c4'], ['search_lag_seconds', 'seconds', '--c3']] },
];

const FIGURES = [
  ['Messages in /s', (s) => s.msgs_in],
  ['Delivered /s', (s) => s.msgs_out],
  ['p50 latency', (s) => (s.p50_ms == null ? '–' : `${s.p50_ms.toFixed(1)} ms`)],
  ['p99 latency', (s) => (s.p99_ms == null ? '–' : `${s.p99_ms.toFixed(1)} ms`)],
  ['Connections', (s) => s.connections],
  ['Sessions', (s) => s.sessions],
  ['CPU', (s) => `${s.cpu_percent.toFixed(0)} %`],
  ['Memory', (s) => `${(s.rss_bytes / 1048576).toFixed(0)} MB`],
  ['Errors /s', (s) => s.errors],
  ['Search lag', (s) => `${s.search_lag_messages} msgs`],
  ['Storage', (s) => ({ ok: 'ok', full: 'FULL: writes refused', failing: 'FAILING: retrying' })[s.storage] ?? '–'],
];

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  e.append(...children);
  return e;
}

const canvases = CHARTS.map((c, i) => {
  const canvas = el('canvas', { id: `chart-${i}`, role: 'img', 'aria-label': c.title });
  const legend = el('div', { class: 'legend' });
  for (const [, label, color] of c.series) {
    const s = el('span', {}, label);
    s.style.setProperty('--swatch', `var(${color})`);
    legend.append(s);
  }
  $('charts').append(el('figure', { class: 'chart' }, el('h2', {}, c.title), canvas, legend));
  return canvas;
});

const figureEls = FIGURES.map(([label]) => {
  const value = el('div', { class: 'value' }, '–');
  $('figures').append(el('div', { class: 'figure' }, el('div', { class: 'label' }, label), value));
  return value;
});

function value(s, key) {
  if (key === 'rss_mb') return s.rss_bytes / 1048576;
  const v = s[key];
  return v == null ? null : Number(v);
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function draw(canvas, chart) {
  const css = getComputedStyle(document.documentElement);
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth;
  const h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * ratio)) canvas.width = Math.round(w * ratio);
  if (canvas.height !== Math.round(h * ratio)) canvas.height = Math.round(h * ratio);
  const g = canvas.getContext('2d');
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, w, h);
  const left = 44;
  const bottom = 16;
  const plotW = w - left - 4;
  const plotH = h - bottom - 6;
  let max = 0;
  for (const s of samples) for (const [key] of chart.series) max = Math.max(max, value(s, key) ?? 0);
  max = niceMax(max);
  g.font = '11px system-ui, sans-serif';
  g.fillStyle = css.getPropertyValue('--muted');
  g.strokeStyle = css.getPropertyValue('--line');
  g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = 6 + plotH - (plotH * i) / 4;
    g.beginPath();
    g.moveTo(left, y);
    g.lineTo(left + plotW, y);
    g.stroke();
    const label = (max * i) / 4;
    g.fillText(label >= 100 ? label.toFixed(0) : String(+label.toFixed(2)), 2, y + 4);
  }
  g.fillText('−15 min', left, h - 3);
  g.fillText('now', left + plotW - 22, h - 3);
  const x = (i) => left + plotW - ((samples.length - 1 - i) / (MAX - 1)) * plotW;
  for (const [key, , color] of chart.series) {
    g.strokeStyle = css.getPropertyValue(color);
    g.lineWidth = 1.6;
    g.beginPath();
    let pen = false;
    samples.forEach((s, i) => {
      const v = value(s, key);
      if (v == null) {
        pen = false;
        return;
      }
      const y = 6 + plotH - (Math.min(v, max) / max) * plotH;
      if (pen) g.lineTo(x(i), y);
      else g.moveTo(x(i), y);
      pen = true;
    });
    g.stroke();
  }
}

function render() {
  CHARTS.forEach((c, i) => draw(canvases[i], c));
  const last = samples[samples.length - 1];
  if (last) FIGURES.forEach(([, f], i) => (figureEls[i].textContent = String(f(last))));
  window.confabStatusSamples = samples.length;
}

async function meta(token) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const r = await fetch('/api/v1/status?history=0', { headers, cache: 'no-store' });
  if (r.status === 403) return false;
  if (!r.ok) throw new Error(`HTTP ${r.status}`);
  const s = await r.json();
  const up = s.uptime_secs;
  const uptime = up >= 86400 ? `${Math.floor(up / 86400)} d ${Math.floor((up % 86400) / 3600)} h` : up >= 3600 ? `${Math.floor(up / 3600)} h ${Math.floor((up % 3600) / 60)} min` : `${Math.floor(up / 60)} min ${up % 60} s`;
  $('meta').textContent = `version ${s.version} (${s.git}) · up ${uptime} · ${s.totals.messages_stored} messages stored since start`;
  return true;
}

let backoff = 500;
function connect(token) {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const ws = new WebSocket(`${scheme}//${location.host}/api/v1/status/ws`, token ? [`status.${token}`] : []);
  ws.onopen = () => {
    backoff = 500;
    $('state').dataset.state = 'live';
    $('state').textContent = 'Live';
  };
  ws.onmessage = (ev) => {
    const m = JSON.parse(ev.data);
    if (m.type === 'history') samples.splice(0, samples.length, ...m.samples);
    else if (m.type === 'sample') {
      samples.push(m.sample);
      if (samples.length > MAX) samples.shift();
    }
    render();
  };
  ws.onclose = () => {
    $('state').dataset.state = 'offline';
    $('state').textContent = 'Reconnecting…';
    setTimeout(() => connect(token), backoff);
    backoff = Math.min(backoff * 2, 10000);
  };
}

async function start() {
  let token = sessionStorage.getItem('confab.statusToken') || '';
  let ok = false;
  try {
    ok = await meta(token);
  } catch (e) {
    $('meta').textContent = `cannot reach the server: ${e.message}`;
  }
  if (!ok) {
    const form = $('token-form');
    form.hidden = false;
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      token = $('token').value;
      if (await meta(token).catch(() => false)) {
        sessionStorage.setItem('confab.statusToken', token);
        form.hidden = true;
        connect(token);
      } else {
        $('token-error').textContent = 'That token is not accepted.';
      }
    });
    return;
  }
  connect(token);
  setInterval(() => meta(token).catch(() => {}), 10000);
}

window.addEventListener('resize', render);
window.matchMedia('(prefers-color-scheme: dark)').addEventListener('change', render);
start();
