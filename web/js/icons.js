// Line icons as inline SVG (24×24, stroked with currentColor), so they look
// the same on every system without an icon font or emoji font.

const NS = 'http://www.w3.org/2000/svg';

const PATHS = {
  newChat: ['M4 5h16v11H9l-5 4z', 'M12 8v5', 'M9.5 10.5h5'],
  group: ['M9 11a3 3 0 1 0 0-6 3 3 0 0 0 0 6z', 'M3 19c0-3 3-5 6-5s6 2 6 5', 'M16 5.3a3 3 0 0 1 0 5.4', 'M17 14c2.4.4 4 2.2 4 5'],
  wallet: ['M3 7h16a2 2 0 0 1 2 2v9a2 2 0 0 1-2 2H5a2 2 0 0 1-2-2z', 'M3 7l12-3v3', 'M16 13.5h2'],
  chart: ['M3 20h18', 'M4 16l5-6 4 4 7-8'],
  download: ['M12 4v11', 'M7 10.5l5 5 5-5', 'M5 20h14'],
  lock: ['M6 11h12v9H6z', 'M8.5 11V8a3.5 3.5 0 0 1 7 0v3'],
  logout: ['M12 3v8', 'M6.3 7a8 8 0 1 0 11.4 0'],
  info: ['M12 21a9 9 0 1 0 0-18 9 9 0 0 0 0 18z', 'M12 11v6', 'M12 7.5v.5'],
  back: ['M19 12H5', 'M11 6l-6 6 6 6'],
  close: ['M6 6l12 12', 'M18 6L6 18'],
  down: ['M6 9l6 6 6-6'],
  check: ['M4 12.5l4.5 4.5L19 7'],
  checks: ['M2 12.5l4.5 4.5L17 7', 'M11.5 16.5l.5.5L22.5 7'],
  clock: ['M12 21a9 9 0 1 0 0-18 9 9 0 0 0 0 18z', 'M12 7v5l3 2'],
  alert: ['M12 21a9 9 0 1 0 0-18 9 9 0 0 0 0 18z', 'M12 7v6', 'M12 16.5v.5'],
  money: ['M12 3v18', 'M17 7.5c-1-1.3-2.8-2-5-2-2.8 0-4.5 1.3-4.5 3.2 0 4.3 9.5 2.3 9.5 6.8 0 1.9-1.9 3.2-5 3.2-2.3 0-4.1-.8-5-2.2'],
};

/** An `<svg>` icon by name; decorative (the control around it carries the name). */
export function icon(name, cls) {
  const svg = document.createElementNS(NS, 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('aria-hidden', 'true');
  svg.setAttribute('focusable', 'false');
  svg.setAttribute('class', `ic ${cls || ''}`);
  for (const d of PATHS[name] || []) {
    const p = document.createElementNS(NS, 'path');
    p.setAttribute('d', d);
    svg.append(p);
  }
  return svg;
}
