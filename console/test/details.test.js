import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { fold } from '../src/fold.js';
import { dependencies, visibleGraph } from '../src/view.js';
import { detailsChildren } from '../src/details.js';

// Just enough of the DOM for el() and the panel, with the DOM's rule that matters here: append and
// replaceChildren turn anything that is not a node into text, null into "null".
class FakeNode {
  constructor(tag) {
    this.tag = tag;
    this.children = [];
    this.dataset = {};
    this.attributes = {};
    this.className = '';
  }
  setAttribute(k, v) {
    this.attributes[k] = String(v);
  }
  addEventListener() {}
  append(...nodes) {
    for (const n of nodes) this.children.push(n instanceof FakeNode ? n : String(n));
  }
  replaceChildren(...nodes) {
    this.children = [];
    this.append(...nodes);
  }
  get textContent() {
    return this.children.map((c) => (typeof c === 'string' ? c : ` ${c.textContent} `)).join('');
  }
}

const saved = {};
beforeAll(() => {
  saved.Node = globalThis.Node;
  saved.document = globalThis.document;
  globalThis.Node = FakeNode;
  globalThis.document = { createElement: (tag) => new FakeNode(tag) };
});
afterAll(() => {
  globalThis.Node = saved.Node;
  globalThis.document = saved.document;
});

// The demo's web host calling a partner's server that has no agent; the host has no labels, the
// address neither labels nor services.
const raw = {
  generation: 1,
  nodes: [
    { id: 'host:web', kind: 'host', name: 'web', properties: { hostname: 'web', agent_state: 'connected' } },
    { id: 'addr:198.18.1.2', kind: 'address', name: '198.18.1.2', properties: {} },
    { id: 'addr:198.19.0.2', kind: 'address', name: '198.19.0.2', properties: {} },
  ],
  edges: [
    { from: 'host:web', to: 'addr:198.18.1.2', kind: 'HAS_ADDRESS' },
    { from: 'host:web', to: 'addr:198.19.0.2', kind: 'CONNECTS_TO', port: 80, protocol: 'tcp', process: 'curl', sockets: 1, active: true },
  ],
};

function panel(id, graph = raw) {
  const folded = fold(graph);
  const deps = dependencies(visibleGraph(folded), id);
  const p = new FakeNode('aside');
  const peer = (peerId) => {
    const link = new FakeNode('button');
    link.append(peerId);
    return link;
  };
  p.replaceChildren(...detailsChildren(folded.nodes.get(id), deps, { peer, close: () => {}, hide: () => {} }));
  return p.textContent.replace(/\s+/g, ' ').trim();
}

describe('the side panel', () => {
  it('shows an external endpoint without a stray "null"', () => {
    const text = panel('addr:198.19.0.2');
    expect(text).toContain('external endpoint (no agent owns this address)');
    expect(text).toContain('Used by (1)');
    expect(text).toContain('host:web 80/tcp curl 1');
    expect(text).not.toMatch(/null/);
  });

  it('shows a host with no labels and no services without a stray "null"', () => {
    const text = panel('host:web');
    expect(text).toContain('agent web');
    expect(text).toContain('Addresses 198.18.1.2');
    expect(text).toContain('Depends on (1)');
    expect(text).not.toMatch(/null/);
  });

  it('shows an address another agent claims too, naming both', () => {
    const conflict = 'claimed by agents web, rogue; the map keeps it on web';
    const claimed = structuredClone(raw);
    claimed.nodes[1].properties.conflict = conflict;
    claimed.nodes.push({ id: 'host:rogue', kind: 'host', name: 'rogue', properties: {} });
    claimed.edges.push({ from: 'host:rogue', to: 'addr:198.18.1.2', kind: 'HAS_ADDRESS' });
    for (const id of ['host:web', 'host:rogue']) {
      expect(panel(id, claimed)).toContain(`Addresses 198.18.1.2 conflict: ${conflict}`);
    }
    expect(panel('host:web')).not.toContain('conflict');
  });
});
