import { describe, expect, it } from 'vitest';
import { presentAt, changesBetween, graphAt, changeText } from '../src/history.js';

const edge = (at, appeared, from, to, extra = {}) => ({
  at,
  appeared,
  kind: 'edge',
  id: `${from}|${to}|6379/tcp`,
  from,
  to,
  port: 6379,
  protocol: 'tcp',
  process: 'redis-cli',
  via: '',
  ...extra,
});

const changes = [
  edge(1, true, 'host:a', 'svc:db/tcp/6379'),
  edge(2, true, 'host:b', 'svc:db/tcp/6379'),
  edge(5, false, 'host:a', 'svc:db/tcp/6379'),
  edge(6, true, 'host:c', 'svc:db/tcp/6379'),
  edge(7, false, 'host:c', 'svc:db/tcp/6379'),
  edge(8, true, 'addr:10.0.0.9', 'svc:db/tcp/6379', { via: '10.96.0.10:6379' }),
];

describe('history', () => {
  it('holds what was present at a time', () => {
    expect([...presentAt(changes, 4).keys()]).toEqual(['host:a|svc:db/tcp/6379|6379/tcp', 'host:b|svc:db/tcp/6379|6379/tcp']);
    expect([...presentAt(changes, 6).keys()]).toEqual(['host:b|svc:db/tcp/6379|6379/tcp', 'host:c|svc:db/tcp/6379|6379/tcp']);
  });

  it('tells what appeared, went, and came and went between two times', () => {
    const d = changesBetween(changes, 4, 9);
    expect(d.added.map((c) => c.from)).toEqual(['addr:10.0.0.9']);
    expect(d.gone.map((c) => [c.at, c.from])).toEqual([[5, 'host:a']]);
    expect(d.between.map((c) => c.from)).toEqual(['host:c']);
  });

  it('draws the map of a time from today’s nodes and that time’s edges', () => {
    const raw = {
      generation: 3,
      nodes: [
        { id: 'host:b', kind: 'host', name: 'b', properties: {} },
        { id: 'host:db', kind: 'host', name: 'db', properties: {} },
        { id: 'svc:db/tcp/6379', kind: 'service', name: 'db:6379/tcp', properties: { host: 'db', port: '6379', protocol: 'tcp' } },
      ],
      edges: [
        { from: 'host:db', to: 'svc:db/tcp/6379', kind: 'LISTENS', port: 6379, protocol: 'tcp' },
        { from: 'host:b', to: 'svc:db/tcp/6379', kind: 'CONNECTS_TO', port: 6379, protocol: 'tcp', process: 'now', active: true },
      ],
    };
    const g = graphAt(raw, changes, 4);
    expect(g.generation).toBe(3);
    expect(g.edges.filter((e) => e.kind === 'CONNECTS_TO').map((e) => e.from)).toEqual(['host:a', 'host:b']);
    // host:a is gone from today's map: a node stands in for it.
    expect(g.nodes.find((n) => n.id === 'host:a')).toEqual({ id: 'host:a', kind: 'host', name: 'a', properties: {} });
    expect(changeText(changes[5])).toBe('addr:10.0.0.9 → svc:db/tcp/6379 6379/tcp (redis-cli) via 10.96.0.10:6379');
  });
});
