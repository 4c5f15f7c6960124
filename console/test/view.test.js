import { describe, expect, it } from 'vitest';
import { fold, labelKeys, defaultColourKey } from '../src/fold.js';
import { visibleGraph, clusters, counts, countsText, search, dependencies, parseLabelFilter, neighbourCounts } from '../src/view.js';
import { graph } from '../dev/fixture.js';

const ids = (view) => [...view.nodes.keys()].sort();
const pairs = (view) => [...view.edges.values()].map((e) => [e.from, e.to]).sort();

describe('fold', () => {
  const f = fold(graph());

  it('draws hosts and the addresses no host owns, folding services and own addresses into hosts', () => {
    expect([...f.nodes.keys()].filter((id) => id.startsWith('addr:')).sort()).toEqual(['addr:10.0.0.100', 'addr:203.0.113.7']);
    expect(f.nodes.get('host:db-1').services).toEqual([{ name: 'db-1:5432/tcp', port: 5432, protocol: 'tcp', process: 'postgres' }]);
    expect(f.nodes.get('host:db-1').addresses).toEqual([{ ip: '10.0.3.41', dns: null }]);
    expect(f.nodes.get('addr:203.0.113.7')).toMatchObject({ kind: 'external', label: 'api.payments.example (203.0.113.7)', labels: { owner: 'saas' } });
    expect(f.nodes.get('host:batch-2').state).toBe('lost');
  });

  it('aggregates connections per ordered pair of owners and drops self-loops', () => {
    const raw = {
      generation: 1,
      nodes: [
        { id: 'host:a', kind: 'host', name: 'a', properties: {} },
        { id: 'host:b', kind: 'host', name: 'b', properties: {} },
        { id: 'addr:10.0.0.2', kind: 'address', name: '10.0.0.2', properties: {} },
        { id: 'svc:b/tcp/80', kind: 'service', name: 'b:80/tcp', properties: { host: 'b', port: '80', protocol: 'tcp' } },
      ],
      edges: [
        { from: 'host:b', to: 'addr:10.0.0.2', kind: 'HAS_ADDRESS' },
        { from: 'host:a', to: 'svc:b/tcp/80', kind: 'CONNECTS_TO', port: 80, protocol: 'tcp', process: 'curl', sockets: 2, via: '10.0.0.2:8080' },
        { from: 'host:a', to: 'addr:10.0.0.2', kind: 'CONNECTS_TO', port: 22, protocol: 'tcp', process: 'ssh', sockets: 1 },
        { from: 'host:b', to: 'svc:b/tcp/80', kind: 'CONNECTS_TO', port: 80, protocol: 'tcp', process: 'curl', sockets: 1 },
      ],
    };
    const g = fold(raw);
    expect([...g.nodes.keys()]).toEqual(['host:a', 'host:b']);
    expect([...g.edges.keys()]).toEqual(['host:a->host:b']);
    expect(g.edges.get('host:a->host:b').conns.map((c) => [c.port, c.process, c.sockets, c.via])).toEqual([
      [22, 'ssh', 1, ''],
      [80, 'curl', 2, '10.0.0.2:8080'],
    ]);
  });

  it('offers the label keys, role first by default', () => {
    expect(labelKeys(f)).toEqual(['dc', 'owner', 'role', 'zone']);
    expect(defaultColourKey(labelKeys(f))).toBe('role');
    expect(defaultColourKey(['dc', 'zone'])).toBe('dc');
    expect(defaultColourKey([])).toBe('');
  });
});

describe('visibleGraph', () => {
  const f = fold(graph());

  it('hides control-plane edges and the controller address by default, shows them on request', () => {
    const v = visibleGraph(f);
    expect(v.nodes.has('addr:10.0.0.100')).toBe(false);
    expect(pairs(v).some(([, b]) => b === 'addr:10.0.0.100')).toBe(false);
    const all = visibleGraph(f, { showControlPlane: true });
    expect(all.nodes.has('addr:10.0.0.100')).toBe(true);
    expect(all.edges.get('host:web-1->addr:10.0.0.100').conns[0].port).toBe(7443);
  });

  it('the hub hides the clusters; hiding it by hand or by degree shows them', () => {
    const v = visibleGraph(f);
    expect(clusters(v)).toHaveLength(1);
    const split = [
      ['addr:203.0.113.7', 'host:app-1', 'host:app-2', 'host:cache-1', 'host:db-1', 'host:web-1', 'host:web-2', 'host:web-3'],
      ['host:batch-1', 'host:batch-2', 'host:db-2'],
    ];
    expect(clusters(visibleGraph(f, { hidden: new Set(['host:dns-1']) }))).toEqual(split);
    // dns-1 has 10 neighbours, app-1 7 (3 web, db-1, cache-1, the payments API, dns-1)
    expect(neighbourCounts(v.nodes.keys(), v.edges).get('host:dns-1')).toBe(10);
    expect(neighbourCounts(v.nodes.keys(), v.edges).get('host:app-1')).toBe(7);
    expect(clusters(visibleGraph(f, { hubDegree: 8 }))).toEqual(split);
    const c = counts(visibleGraph(f, { hubDegree: 8 }));
    expect(c).toEqual({ hosts: 10, externals: 1, connections: 13, clusters: 2 });
    expect(countsText(c)).toBe('10 hosts · 1 external · 13 connections · 2 clusters');
    expect(countsText({ hosts: 1, externals: 0, connections: 1, clusters: 1 })).toBe('1 host · 1 connection · 1 cluster');
  });

  it('filters by port and protocol, showing only the nodes still connected', () => {
    const v = visibleGraph(f, { port: '5432' });
    expect(ids(v)).toEqual(['host:app-1', 'host:app-2', 'host:batch-1', 'host:batch-2', 'host:db-1', 'host:db-2']);
    const udp = visibleGraph(f, { protocol: 'udp' });
    expect(pairs(udp).every(([, b]) => b === 'host:dns-1')).toBe(true);
    expect(udp.edges.size).toBe(10);
    expect(visibleGraph(f, { protocol: 'tcp', port: 53 }).nodes.size).toBe(0);
  });

  it('filters by label: the matching nodes and what they talk to', () => {
    expect(parseLabelFilter(' role=db, dc ')).toEqual([['role', 'db'], ['dc', null]]);
    const v = visibleGraph(f, { label: 'role=db' });
    expect(ids(v)).toEqual(['host:app-1', 'host:app-2', 'host:batch-1', 'host:batch-2', 'host:db-1', 'host:db-2', 'host:dns-1']);
    const saas = visibleGraph(f, { label: 'owner=saas' });
    expect(pairs(saas)).toEqual([['host:app-1', 'addr:203.0.113.7']]);
  });

  it('search finds hostnames, agent ids, own and external IPs, DNS names', () => {
    expect(search(f, 'db-1').id).toBe('host:db-1');
    expect(search(f, '10.0.3.42').id).toBe('host:db-2');
    expect(search(f, '203.0.113.7').id).toBe('addr:203.0.113.7');
    expect(search(f, 'payments').id).toBe('addr:203.0.113.7');
    expect(search(f, 'nothing-like-this')).toBe(null);
    expect(search(f, '')).toBe(null);
  });

  it('lists inbound and outbound dependencies', () => {
    const d = dependencies(visibleGraph(f), 'host:db-1');
    expect(d.outbound.map((x) => x.peer)).toEqual(['host:dns-1']);
    expect(d.inbound.map((x) => [x.peer, x.port, x.process, x.sockets])).toEqual([
      ['host:app-1', 5432, 'java', 10],
      ['host:app-2', 5432, 'java', 10],
    ]);
  });
});

describe('process notes', () => {
  it('an edge whose client process is unknown says why, in the tooltip and the side panel', async () => {
    const { processText } = await import('../src/format.js');
    const f = fold({
      nodes: [
        { id: 'host:a', kind: 'host', name: 'a', properties: {} },
        { id: 'host:b', kind: 'host', name: 'b', properties: {} },
        { id: 'svc:b/tcp/80', kind: 'service', name: 'b:80/tcp', properties: { port: '80', protocol: 'tcp', process: 'nginx' } },
      ],
      edges: [
        { from: 'host:b', to: 'svc:b/tcp/80', kind: 'LISTENS', port: 80, protocol: 'tcp' },
        { from: 'host:a', to: 'svc:b/tcp/80', kind: 'CONNECTS_TO', port: 80, protocol: 'tcp', process: '', process_note: 'process unknown: no BPF on this host', sockets: 1, active: true },
        { from: 'host:a', to: 'svc:b/tcp/80', kind: 'CONNECTS_TO', port: 81, protocol: 'tcp', process: 'curl', sockets: 1, active: true },
      ],
    });
    const conns = f.edges.get('host:a->host:b').conns;
    expect(conns.map(processText)).toEqual(['? (process unknown: no BPF on this host)', 'curl']);
    expect(processText({ process: '' })).toBe('?');
  });
});
