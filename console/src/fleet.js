// The fleet page: one row per agent, with its mirror figures joined in from /api/v1/mirror.
import { ago, si, ms, el } from './format.js';

/** Per agent (id or hostname): packets lost in transit, lost batches, controller drops, worst delay p99 (µs). Pure. */
export function mirrorByAgent(rows) {
  const out = new Map();
  for (const r of rows || []) {
    const m = out.get(r.agent) || { lost: 0, batchesLost: 0, dropped: 0, received: 0, delayP99us: null, targets: [] };
    m.lost += r.lost_in_transit || 0;
    m.batchesLost += r.batches_lost || 0;
    m.received += r.packets_received || 0;
    m.dropped += Object.values(r.dropped || {}).reduce((s, v) => s + v, 0);
    if (r.delay_p99_us !== null && r.delay_p99_us !== undefined) m.delayP99us = Math.max(m.delayP99us ?? 0, r.delay_p99_us);
    m.targets.push(r.target);
    out.set(r.agent, m);
  }
  return out;
}

const KNOWN_STATES = new Set(['connected', 'degraded', 'lost']);

/** The controller replica holding the agent's session, or a dash while it has none. Pure. */
export function controllerText(a) {
  return a.controller || '–';
}

export function createFleet(root) {
  const tbody = root.querySelector('#fleet-table tbody');
  const summary = root.querySelector('#fleet-summary');
  const events = root.querySelector('#events');
  let agents = [];
  let mirror = new Map();
  let eventCount = 0;

  function row(a, now) {
    const m = mirror.get(a.id) || mirror.get(a.hostname);
    const st = KNOWN_STATES.has(a.state) ? a.state : 'other';
    const c = a.capture || {};
    const policyMismatch = a.policy_version_applied !== a.policy_version_sent;
    const stateCell = el(
      'td',
      { title: a.state_reason || null },
      el('span', { class: `badge state-${st}` }, a.state),
      a.state_reason ? el('div', { class: 'reason' }, a.state_reason) : null,
    );
    const policyCell = el(
      'td',
      { class: policyMismatch || a.policy_error ? 'warn-cell' : '' },
      a.policy_name || '–',
      ' ',
      el('span', { class: policyMismatch ? 'mismatch' : 'muted', title: policyMismatch ? 'applied version differs from the version sent' : null }, `v${a.policy_version_applied} / v${a.policy_version_sent}`),
      a.policy_error ? el('div', { class: 'error' }, a.policy_error) : null,
    );
    const captureCell = el(
      'td',
      { class: c.state === 'failed' || c.state === 'stopped_breach' ? 'warn-cell' : '' },
      c.state || '–',
      c.error ? el('div', { class: 'error' }, c.error) : null,
    );
    const drops = [c.packets_dropped_kernel, c.packets_dropped_limiter, c.packets_dropped_queue];
    const dropsCell = el('td', { class: `r${drops.some((d) => d > 0) ? ' warn-text' : ''}` }, drops.map((d) => si(d ?? 0)).join(' / '));
    const lossCell = m
      ? el(
          'td',
          { class: `r${m.lost || m.batchesLost || m.dropped ? ' warn-text' : ''}`, title: `targets: ${m.targets.join(', ')}; dropped at the controller: ${m.dropped}` },
          `${si(m.lost)}${m.batchesLost ? ` (${m.batchesLost} ${m.batchesLost === 1 ? 'batch' : 'batches'})` : ''}`,
          m.dropped ? el('div', { class: 'reason' }, `${si(m.dropped)} dropped at the controller`) : null,
        )
      : el('td', { class: 'r muted' }, '–');
    const delayCell = el('td', { class: 'r' }, m && m.delayP99us !== null ? ms(m.delayP99us / 1000) : '–');
    return el(
      'tr',
      { class: `state-${st}`, dataset: { agent: a.id, state: a.state } },
      el('td', {}, el('code', {}, a.id)),
      el('td', {}, a.hostname),
      stateCell,
      el('td', { class: a.controller ? null : 'muted' }, controllerText(a)),
      el('td', { title: a.last_seen_unix_ms ? new Date(a.last_seen_unix_ms).toISOString() : null, class: 'ago', dataset: { ms: String(a.last_seen_unix_ms || 0) } }, ago(a.last_seen_unix_ms, now)),
      policyCell,
      captureCell,
      el('td', { class: 'r' }, si(a.capture_pps)),
      el('td', { class: 'r', title: a.send_bps ? `${si(a.send_bps)}bit/s` : null }, si(a.send_pps)),
      dropsCell,
      lossCell,
      delayCell,
      el('td', { class: 'r', title: a.probe_rtt_ms !== null && a.probe_rtt_ms !== undefined ? `probe round trip ${ms(a.probe_rtt_ms)}` : null }, ms(a.clock_offset_ms, true)),
    );
  }

  function render() {
    const now = Date.now();
    // Lost first, then degraded: what needs a look is at the top of a long table.
    const rank = (a) => (a.state === 'lost' ? 0 : a.state === 'degraded' ? 1 : a.state === 'connected' ? 3 : 2);
    const sorted = [...agents].sort((a, b) => rank(a) - rank(b) || (a.hostname || a.id).localeCompare(b.hostname || b.id));
    tbody.replaceChildren(...(sorted.length ? sorted.map((a) => row(a, now)) : [el('tr', {}, el('td', { colspan: '13', class: 'muted' }, 'No agent has connected yet.'))]));
    const by = (s) => agents.filter((a) => a.state === s).length;
    summary.textContent = `${agents.length} agents · ${by('connected')} connected · ${by('degraded')} degraded · ${by('lost')} lost`;
  }

  // "last seen" ages every second without a refetch
  setInterval(() => {
    const now = Date.now();
    for (const td of tbody.querySelectorAll('td.ago')) td.textContent = ago(Number(td.dataset.ms), now);
  }, 1000);

  return {
    set(nextAgents, mirrorRows) {
      agents = Array.isArray(nextAgents) ? nextAgents : [];
      if (mirrorRows) mirror = mirrorByAgent(mirrorRows);
      render();
    },
    event(e) {
      if (!eventCount++) events.replaceChildren();
      const at = e.at ? new Date(e.at) : new Date();
      const fields = Object.entries(e.fields || {})
        .map(([k, v]) => `${k}=${v}`)
        .join(' ');
      events.prepend(
        el(
          'li',
          { class: `event kind-${String(e.kind || '').replace(/[^a-z0-9_-]/gi, '')}` },
          el('time', { datetime: at.toISOString() }, at.toLocaleTimeString()),
          ' ',
          el('span', { class: 'badge' }, e.kind || 'event'),
          ' ',
          e.agent_id ? el('code', {}, e.agent_id) : null,
          ' ',
          e.message || '',
          fields ? el('span', { class: 'muted' }, ` ${fields}`) : null,
        ),
      );
      while (events.children.length > 100) events.lastElementChild.remove();
    },
  };
}
