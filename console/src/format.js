// Small presentation helpers. Pure.

/** "4 s ago", "3 min ago", "2 h ago", "5 d ago"; "never" for 0 or missing. */
export function ago(unixMs, now = Date.now()) {
  if (!unixMs) return 'never';
  const s = Math.max(0, Math.round((now - unixMs) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

/** 1234567 → "1.23 M", 850.5 → "851", 0 → "0". */
export function si(n) {
  if (n === null || n === undefined || Number.isNaN(Number(n))) return '–';
  const x = Number(n);
  const a = Math.abs(x);
  if (a >= 1e9) return `${(x / 1e9).toFixed(2)} G`;
  if (a >= 1e6) return `${(x / 1e6).toFixed(2)} M`;
  if (a >= 1e4) return `${(x / 1e3).toFixed(1)} k`;
  return String(Math.round(x));
}

/** Milliseconds with a sensible precision, signed when asked. */
export function ms(v, signed = false) {
  if (v === null || v === undefined) return '–';
  const x = Number(v);
  const digits = Math.abs(x) < 10 ? 2 : Math.abs(x) < 100 ? 1 : 0;
  return `${signed && x > 0 ? '+' : ''}${x.toFixed(digits)} ms`;
}

/** Creates an element: el('td', {class: 'r', title: '…'}, 'text' | Node, …). Text only, never HTML. */
export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'dataset') Object.assign(e.dataset, v);
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

/** A byte count: "512 B", "1.5 kB", "3.2 MB" (powers of 1000), as tapgraphctl prints it. */
export function bytes(n) {
  const x = Number(n) || 0;
  if (x < 1000) return `${Math.round(x)} B`;
  const units = ['kB', 'MB', 'GB', 'TB', 'PB', 'EB'];
  let v = x / 1000;
  let u = 0;
  while (v >= 999.95 && u + 1 < units.length) {
    v /= 1000;
    u += 1;
  }
  return `${v.toFixed(1)} ${units[u]}`;
}

/** A round-trip time given in microseconds: "850 µs", "10.4 ms", "1.3 s"; "–" for none (0). */
export function rtt(us) {
  const x = Number(us) || 0;
  if (x <= 0) return '–';
  if (x < 1000) return `${Math.round(x)} µs`;
  if (x < 1e6) return `${(x / 1000).toFixed(1)} ms`;
  return `${(x / 1e6).toFixed(1)} s`;
}

/** A connection's process, or `?` with the reason its agent gave when it is unknown. */
export function processText(c) {
  if (c.process) return c.process;
  return c.process_note ? `? (${c.process_note})` : '?';
}
