// The map's side panel: what one node is, what it depends on and what depends on it. Builds the
// elements only; map.js owns the panel, the selection and what the buttons do.
import { bytes, el, processText, rtt } from './format.js';
import { protocolName } from './view.js';

function depTable(rows, heading, peer) {
  if (!rows.length) return el('p', { class: 'muted' }, `${heading}: none`);
  return el(
    'div',
    {},
    el('h3', {}, `${heading} (${rows.length})`),
    el(
      'table',
      { class: 'grid compact' },
      el('thead', {}, el('tr', {}, el('th', {}, 'peer'), el('th', {}, 'port'), el('th', {}, 'process'), el('th', { class: 'r' }, 'sockets'), el('th', { class: 'r', title: 'client to server / back, smoothed RTT' }, 'traffic'))),
      el(
        'tbody',
        {},
        rows.map((r) =>
          el(
            'tr',
            { class: r.active ? '' : 'inactive', title: r.active ? null : 'inactive' },
            el('td', {}, peer(r.peer)),
            el('td', {}, `${r.port}/${protocolName(r.protocol)}`),
            el('td', {}, processText(r)),
            el('td', { class: 'r' }, String(r.sockets)),
            el('td', { class: 'r' }, r.traffic ? `${bytes(r.traffic.bytes_sent)} / ${bytes(r.traffic.bytes_received)}, ${rtt(r.traffic.srtt_us)}` : '–'),
          ),
        ),
      ),
    ),
  );
}

/**
 * The panel's children for folded node `n` and its dependencies `deps` ({outbound, inbound}, see
 * view.js): `peer(id)` makes a link to a peer, `close()` and `hide()` are the buttons' actions.
 * Sections the node lacks (labels, addresses, services; an external endpoint has neither labels
 * nor services) are left out of the list: `replaceChildren` would print a null as the text "null".
 */
export function detailsChildren(n, deps, { peer, close, hide }) {
  const labels = Object.entries(n.labels).sort();
  const parts = [
    el(
      'div',
      { class: 'details-head' },
      el('h2', {}, n.label),
      el('button', { type: 'button', class: 'close', title: 'Close', onclick: close }, '×'),
    ),
    el(
      'p',
      { class: 'muted' },
      n.kind === 'host'
        ? `host ${n.hostname && n.hostname !== n.name ? n.hostname : ''} · agent ${n.name}`.replace('host  ·', 'host ·')
        : 'external endpoint (no agent owns this address)',
      n.state
        ? el('span', { class: `badge state-${n.state}` }, n.state)
        : n.kind === 'host'
          ? el('span', { class: 'badge', title: 'the controller has not heard from this agent since it started' }, 'state unknown')
          : null,
    ),
    el('div', { class: 'actions' }, el('button', { type: 'button', id: 'hide-node', onclick: hide }, 'Hide this node')),
    labels.length
      ? el('div', {}, el('h3', {}, 'Labels'), el('ul', { class: 'kv' }, labels.map(([k, v]) => el('li', {}, el('code', {}, `${k}=${v}`)))))
      : null,
    n.addresses.length
      ? el('div', {}, el('h3', {}, 'Addresses'), el('ul', { class: 'kv' }, n.addresses.map((a) =>
              el(
                'li',
                {},
                a.ip,
                a.dns ? ` (${a.dns})` : '',
                // Another agent claims this address too: the controller names both.
                a.conflict ? el('span', { class: 'badge state-degraded', title: a.conflict }, `conflict: ${a.conflict}`) : '',
              ),
            )))
      : null,
    n.services.length
      ? el(
          'div',
          {},
          el('h3', {}, 'Services'),
          el('ul', { class: 'kv' }, n.services.map((s) => el('li', {}, `${s.port}/${s.protocol}`, s.process ? ` ${s.process}` : ''))),
        )
      : null,
    depTable(deps.outbound, 'Depends on', peer),
    depTable(deps.inbound, 'Used by', peer),
  ];
  return parts.filter((p) => p !== null);
}
