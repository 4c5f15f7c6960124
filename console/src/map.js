// The map page: the folded, filtered graph drawn with cytoscape.js. Every change (a live update, a
// filter, hiding a node) goes through one path: compute the visible graph, diff it against what is
// drawn, and apply the difference, so nodes that stay never move.
import cytoscape from 'cytoscape';
import cytoscapeSvg from 'cytoscape-svg';
import { fold, labelKeys, defaultColourKey } from './fold.js';
import { visibleGraph, clusters, counts, countsText, search, dependencies, neighbourCounts, protocolName } from './view.js';
import { diff, placeNew } from './diff.js';
import { colourScale, colourOf, NO_VALUE } from './colours.js';
import { layout } from './layout.js';
import { el, processText } from './format.js';
import { detailsChildren } from './details.js';

cytoscape.use(cytoscapeSvg);

// cytoscape inserts a <style> element unless one with this id exists; the Content-Security-Policy
// (style-src 'self') would refuse it. Our stylesheet already gives the container what it sets.
const CY_STYLESHEET_ID = '__________cytoscape_stylesheet';

const STYLE = [
  {
    selector: 'node',
    style: {
      shape: 'ellipse',
      width: 22,
      height: 22,
      'background-color': 'data(colour)',
      'border-width': 1.5,
      'border-color': '#3d4450',
      label: 'data(label)',
      'font-family': 'system-ui, sans-serif',
      'font-size': 11,
      color: '#1d2330',
      'text-valign': 'bottom',
      'text-margin-y': 4,
      'text-background-color': '#ffffff',
      'text-background-opacity': 0.7,
      'text-background-padding': 1,
      'min-zoomed-font-size': 7,
    },
  },
  {
    selector: 'node[kind = "external"]',
    style: { shape: 'diamond', width: 24, height: 24, 'border-width': 2.5, 'border-color': '#8a5a00', 'border-style': 'dashed', color: '#6b4600' },
  },
  { selector: 'node[state = "degraded"]', style: { 'border-width': 4, 'border-color': '#e39400' } },
  { selector: 'node[state = "lost"]', style: { 'border-width': 4, 'border-color': '#d0302f', 'background-opacity': 0.45, color: '#b32222' } },
  { selector: 'node:selected', style: { 'overlay-color': '#2f6db5', 'overlay-opacity': 0.25, 'overlay-padding': 6 } },
  {
    selector: 'edge',
    style: {
      width: 'data(width)',
      'line-color': '#9aa3b0',
      'curve-style': 'bezier',
      'target-arrow-shape': 'triangle',
      'target-arrow-color': '#9aa3b0',
      'arrow-scale': 0.8,
    },
  },
  { selector: 'edge[?inactive]', style: { 'line-style': 'dashed', opacity: 0.6 } },
  { selector: 'edge[?cp]', style: { 'line-color': '#c9ced6', 'target-arrow-color': '#c9ced6', 'line-style': 'dotted' } },
  { selector: 'edge:selected, edge.near', style: { 'line-color': '#2f6db5', 'target-arrow-color': '#2f6db5' } },
];

function connText(c) {
  return `${c.port}/${protocolName(c.protocol)} ${processText(c)}${c.sockets > 1 ? ` ×${c.sockets}` : ''}${c.active ? '' : ' (inactive)'}${c.control_plane ? ' (control plane)' : ''}`;
}

export function createMap(root) {
  const $ = (sel) => root.querySelector(sel);
  const container = $('#cy');
  const details = $('#details');
  const tooltip = $('#tooltip');
  const message = $('#map-message');
  const controls = {
    cp: $('#show-control-plane'),
    hub: $('#hub-degree'),
    search: $('#search'),
    port: $('#filter-port'),
    protocol: $('#filter-protocol'),
    label: $('#filter-label'),
    colour: $('#color-by'),
  };

  const state = {
    folded: null,
    view: { nodes: new Map(), edges: new Map() },
    generation: 0,
    hidden: [], // in the order hidden, so the last can be undone first
    colourKey: null, // null: the default key; '' : no colour
    selected: null,
    drawnNodes: new Map(),
    drawnEdges: new Map(),
    parked: new Map(), // positions of nodes filtered out, for when they come back
    needsFit: true,
    drawn: false,
  };

  if (!document.getElementById(CY_STYLESHEET_ID)) {
    const placeholder = document.createElement('meta');
    placeholder.id = CY_STYLESHEET_ID;
    document.head.append(placeholder);
  }
  const cy = cytoscape({
    container,
    style: STYLE,
    minZoom: 0.03,
    maxZoom: 5,
    boxSelectionEnabled: false,
    selectionType: 'single',
  });

  function options() {
    return {
      showControlPlane: controls.cp.checked,
      port: controls.port.value === '' ? null : controls.port.value,
      protocol: controls.protocol.value,
      label: controls.label.value,
      hidden: new Set(state.hidden),
      hubDegree: controls.hub.value === '' ? null : controls.hub.value,
    };
  }

  function colourKey() {
    if (!state.folded) return '';
    return state.colourKey === null ? defaultColourKey(labelKeys(state.folded)) : state.colourKey;
  }

  function nodeData(n, key, scale) {
    return { id: n.id, label: n.label, kind: n.kind, state: n.state || '', colour: colourOf(n, key, scale) };
  }

  function edgeData(e) {
    const sockets = e.conns.reduce((s, c) => s + (c.sockets || 0), 0);
    return {
      id: e.id,
      source: e.from,
      target: e.to,
      width: Math.min(6, 1.2 + Math.log2(1 + sockets) * 0.6),
      inactive: e.conns.every((c) => !c.active),
      cp: e.conns.every((c) => c.control_plane),
      conns: e.conns.map(connText).join('\n'),
    };
  }

  /** Recomputes the visible graph and applies the difference to the drawing. */
  function redraw() {
    if (!state.folded) return;
    const view = visibleGraph(state.folded, options());
    state.view = view;
    const key = colourKey();
    // From every node, not just the visible ones: a filter must not repaint what stays.
    const scale = colourScale(state.folded.nodes.values(), key);
    const nextNodes = new Map([...view.nodes.values()].map((n) => [n.id, nodeData(n, key, scale)]));
    const nextEdges = new Map([...view.edges.values()].map((e) => [e.id, edgeData(e)]));
    const dn = diff(state.drawnNodes, nextNodes);
    const de = diff(state.drawnEdges, nextEdges);

    let positions;
    if (!state.drawn || cy.nodes().empty()) {
      // Nothing drawn that could keep its place: lay the whole view out.
      positions = layout(view);
    } else {
      const placed = new Map();
      cy.nodes().forEach((n) => {
        if (nextNodes.has(n.id())) placed.set(n.id(), { ...n.position() });
      });
      for (const d of dn.add) if (state.parked.has(d.id)) placed.set(d.id, state.parked.get(d.id));
      const neighbours = new Map();
      for (const e of view.edges.values()) {
        if (!neighbours.has(e.from)) neighbours.set(e.from, []);
        if (!neighbours.has(e.to)) neighbours.set(e.to, []);
        neighbours.get(e.from).push(e.to);
        neighbours.get(e.to).push(e.from);
      }
      const fresh = dn.add.map((d) => d.id).filter((id) => !placed.has(id));
      positions = new Map([...placed, ...placeNew(fresh, placed, neighbours)]);
    }

    cy.batch(() => {
      for (const id of de.remove) cy.getElementById(id).remove();
      for (const id of dn.remove) {
        const n = cy.getElementById(id);
        state.parked.set(id, { ...n.position() });
        n.remove();
      }
      if (dn.add.length) cy.add(dn.add.map((data) => ({ group: 'nodes', data, position: { ...positions.get(data.id) } })));
      if (de.add.length) cy.add(de.add.map((data) => ({ group: 'edges', data })));
      for (const data of [...dn.update, ...de.update]) cy.getElementById(data.id).data(data);
    });
    state.drawnNodes = nextNodes;
    state.drawnEdges = nextEdges;
    if (!state.drawn) {
      state.drawn = true;
      fitIfShown();
    }

    const c = counts(view);
    $('#counts').textContent = countsText(c);
    renderLegend(key, scale);
    renderHidden();
    if (state.selected && !view.nodes.has(state.selected)) select(null);
    else if (state.selected) renderDetails(state.selected);
    message.hidden = view.nodes.size > 0;
    message.textContent = view.nodes.size ? '' : state.folded.nodes.size ? 'Nothing matches the filters.' : 'The map is empty: no agent has reported yet.';
  }

  function fitIfShown() {
    if (container.offsetWidth > 0) {
      cy.resize();
      fit();
      state.needsFit = false;
    } else {
      state.needsFit = true;
    }
  }

  /** Fits the drawing, without blowing a handful of nodes up to poster size. */
  function fit() {
    cy.fit(undefined, 30);
    if (cy.zoom() > 1.25) {
      cy.zoom(1.25);
      cy.center();
    }
  }

  function refreshColourOptions() {
    const keys = labelKeys(state.folded);
    const current = colourKey();
    const sel = controls.colour;
    const wanted = ['', ...keys];
    const have = [...sel.options].map((o) => o.value);
    if (JSON.stringify(have) !== JSON.stringify(wanted)) {
      sel.replaceChildren(...wanted.map((k) => el('option', { value: k }, k === '' ? '(none)' : k)));
    }
    sel.value = keys.includes(current) ? current : '';
  }

  function renderLegend(key, scale) {
    const items = [];
    if (key) {
      items.push(el('div', { class: 'legend-title' }, key));
      for (const [v, c] of scale) items.push(swatch(c, v));
      items.push(swatch(NO_VALUE, `no ${key}`));
    }
    items.push(el('div', { class: 'legend-title' }, 'shapes'));
    items.push(el('div', { class: 'legend-row' }, el('span', { class: 'shape host' }), 'host (agent)'));
    items.push(el('div', { class: 'legend-row' }, el('span', { class: 'shape external' }), 'external endpoint'));
    items.push(el('div', { class: 'legend-row' }, el('span', { class: 'shape host degraded' }), 'degraded'));
    items.push(el('div', { class: 'legend-row' }, el('span', { class: 'shape host lost' }), 'lost'));
    $('#legend').replaceChildren(...items);
  }

  function swatch(colour, text) {
    const s = el('span', { class: 'swatch' });
    s.style.backgroundColor = colour;
    return el('div', { class: 'legend-row' }, s, text);
  }

  function renderHidden() {
    const box = $('#hidden-nodes');
    if (!state.hidden.length) {
      box.replaceChildren();
      return;
    }
    const name = (id) => state.folded.nodes.get(id)?.label || id;
    box.replaceChildren(
      el('span', { class: 'muted' }, 'Hidden:'),
      ...state.hidden.map((id) =>
        el('button', { type: 'button', class: 'chip', title: `Show ${name(id)} again`, dataset: { unhide: id }, onclick: () => unhide(id) }, `${name(id)} ×`),
      ),
      el('button', { type: 'button', id: 'unhide-all', class: 'link', onclick: () => unhide(null) }, 'show all'),
    );
  }

  function hide(id) {
    if (!state.hidden.includes(id)) state.hidden.push(id);
    if (state.selected === id) select(null);
    redraw();
  }

  function unhide(id) {
    state.hidden = id === null ? [] : state.hidden.filter((h) => h !== id);
    redraw();
  }

  function select(id) {
    state.selected = id;
    cy.elements(':selected').unselect();
    cy.edges('.near').removeClass('near');
    if (!id) {
      details.hidden = true;
      details.replaceChildren();
      return;
    }
    const n = cy.getElementById(id);
    if (n.nonempty()) {
      n.select();
      n.connectedEdges().addClass('near');
    }
    renderDetails(id);
  }

  function peerButton(id) {
    const n = state.folded.nodes.get(id);
    const shown = state.view.nodes.has(id);
    return el(
      'span',
      {},
      el('button', { type: 'button', class: 'link', dataset: { peer: id }, onclick: () => focus(id) }, n ? n.label : id),
      shown ? null : el('span', { class: 'muted', title: 'hidden or filtered out of the map' }, ' (hidden)'),
    );
  }

  function renderDetails(id) {
    const n = state.folded.nodes.get(id);
    if (!n) return select(null);
    // Every dependency, also through nodes the filters hide (those are marked); control plane as shown.
    const deps = dependencies(visibleGraph(state.folded, { showControlPlane: controls.cp.checked }), id);
    details.hidden = false;
    details.dataset.node = id;
    details.replaceChildren(...detailsChildren(n, deps, { peer: peerButton, close: () => select(null), hide: () => hide(id) }));
  }

  /** Selects a node and brings it into view. */
  function focus(id) {
    const n = cy.getElementById(id);
    if (n.empty()) {
      $('#search-status').textContent = `${state.folded.nodes.get(id)?.label || id} is not shown: hidden or filtered out.`;
      return false;
    }
    $('#search-status').textContent = '';
    select(id);
    // Centre it in the part of the map the details panel leaves free.
    const zoom = Math.max(cy.zoom(), 1.2);
    const free = container.clientWidth - (details.hidden ? 0 : details.offsetWidth);
    const p = n.position();
    cy.animate({ zoom, pan: { x: free / 2 - zoom * p.x, y: container.clientHeight / 2 - zoom * p.y } }, { duration: 250 });
    return true;
  }

  function runSearch() {
    const status = $('#search-status');
    if (!state.folded) return;
    const text = controls.search.value;
    const n = search(state.folded, text);
    if (!n) {
      status.textContent = text.trim() ? `No host or address matches “${text.trim()}”.` : '';
      return;
    }
    if (!state.view.nodes.has(n.id)) {
      status.textContent = `${n.label} is not shown: hidden or filtered out.`;
      return;
    }
    status.textContent = '';
    focus(n.id);
  }

  // Hover: a node's name and state; an edge's connections.
  function showTooltip(evt, lines) {
    tooltip.replaceChildren(...lines.map((l, i) => el('div', { class: i === 0 ? 'tt-title' : '' }, l)));
    const p = evt.renderedPosition || evt.target.renderedPosition();
    tooltip.style.left = `${Math.round(p.x + 14)}px`;
    tooltip.style.top = `${Math.round(p.y + 14)}px`;
    tooltip.hidden = false;
  }
  cy.on('mouseover', 'node', (evt) => {
    const n = state.folded.nodes.get(evt.target.id());
    if (!n) return;
    const lines = [n.label];
    if (n.kind === 'host') lines.push(`agent ${n.name} · ${n.state || 'state unknown'}`);
    else lines.push('external endpoint');
    showTooltip(evt, lines);
  });
  cy.on('mouseover', 'edge', (evt) => {
    const d = evt.target.data();
    const from = state.folded.nodes.get(d.source)?.label || d.source;
    const to = state.folded.nodes.get(d.target)?.label || d.target;
    showTooltip(evt, [`${from} → ${to}`, ...d.conns.split('\n')]);
  });
  cy.on('mouseout', 'node, edge', () => {
    tooltip.hidden = true;
  });
  cy.on('viewport', () => {
    tooltip.hidden = true;
  });
  cy.on('tap', 'node', (evt) => select(evt.target.id()));
  cy.on('tap', (evt) => {
    if (evt.target === cy) select(null);
  });

  // Both events: typing fires `input`, and WebDriver's clear() or a paste may fire only `change`.
  for (const c of [controls.cp, controls.protocol]) c.addEventListener('change', redraw);
  for (const c of [controls.hub, controls.port, controls.label]) {
    c.addEventListener('input', redraw);
    c.addEventListener('change', redraw);
  }
  controls.colour.addEventListener('change', () => {
    state.colourKey = controls.colour.value;
    redraw();
  });
  controls.search.addEventListener('keydown', (e) => {
    if (e.key === 'Enter') {
      e.preventDefault();
      runSearch();
    }
  });
  $('#fit').addEventListener('click', fit);
  $('#relayout').addEventListener('click', () => {
    const start = new Map(cy.nodes().map((n) => [n.id(), { ...n.position() }]));
    const pos = layout(state.view, start);
    cy.batch(() => cy.nodes().forEach((n) => n.position({ ...pos.get(n.id()) })));
    fit();
  });
  $('#export-png').addEventListener('click', () => {
    download(cy.png({ output: 'blob', bg: '#ffffff', full: false, scale: 2 }), 'tapgraph-map.png');
  });
  $('#export-svg').addEventListener('click', () => {
    const svg = cy.svg({ full: false, bg: '#ffffff' });
    download(new Blob([svg], { type: 'image/svg+xml' }), 'tapgraph-map.svg');
  });

  function download(blob, name) {
    const url = URL.createObjectURL(blob);
    const a = el('a', { href: url, download: name });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  }

  return {
    /** Applies a fresh /api/v1/graph answer. */
    setGraph(raw) {
      state.folded = fold(raw);
      refreshColourOptions();
      redraw();
      state.generation = raw.generation ?? 0;
    },
    /** The page became visible: cytoscape needs its size again. */
    shown() {
      cy.resize();
      if (state.needsFit && state.drawn) fitIfShown();
    },
    get generation() {
      return state.generation;
    },
    get drawn() {
      return state.drawn;
    },
    /** What the test hook reports: the drawing itself, not the model. */
    hook() {
      return {
        visible() {
          const nodes = cy.nodes().map((n) => n.id()).sort();
          const edges = cy
            .edges()
            .map((e) => [e.source().id(), e.target().id()])
            .sort((a, b) => (a[0] === b[0] ? (a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0) : a[0] < b[0] ? -1 : 1));
          return { nodes, edges };
        },
        clusters: () => clusters(state.view),
        positions() {
          const out = {};
          cy.nodes().forEach((n) => {
            const p = n.position();
            out[n.id()] = { x: p.x, y: p.y };
          });
          return out;
        },
        counts: () => {
          const c = counts(state.view);
          return { hosts: c.hosts, externals: c.externals, connections: c.connections, clusters: c.clusters };
        },
        degrees: () => Object.fromEntries(neighbourCounts(state.view.nodes.keys(), state.view.edges)),
      };
    },
  };
}
