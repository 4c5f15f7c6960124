import { describe, expect, it } from 'vitest';
import { fold } from '../src/fold.js';
import { connText, edgeTraffic, edgeWidth } from '../src/view.js';
import { bytes, rtt } from '../src/format.js';

const raw = (traffic) => ({
  nodes: [
    { id: 'host:web', kind: 'host', name: 'web', properties: {} },
    { id: 'host:db', kind: 'host', name: 'db', properties: {} },
    { id: 'svc:db/tcp/5432', kind: 'service', name: 'db:5432/tcp', properties: { host: 'db', port: '5432', protocol: 'tcp' } },
  ],
  edges: [
    { from: 'host:web', to: 'svc:db/tcp/5432', kind: 'CONNECTS_TO', port: 5432, protocol: 'tcp', process: 'psql', sockets: 2, active: true, traffic },
  ],
});

describe('edge traffic', () => {
  it('carries the API traffic through the fold into the tooltip', () => {
    const traffic = { bytes_sent: 1500000, bytes_received: 300, srtt_us: 10400, min_rtt_us: 10050, retransmits: 2, measured_by: 'client' };
    const folded = fold(raw(traffic));
    const [edge] = [...folded.edges.values()];
    expect(edge.conns[0].traffic).toEqual(traffic);
    expect(connText(edge.conns[0])).toBe('5432/tcp psql ×2 · 1.5 MB sent / 300 B received · rtt 10.4 ms (min 10.1 ms) · 2 retransmits');
    expect(edgeTraffic(edge.conns)).toEqual({ sent: 1500000, received: 300, srtt_us: 10400, retransmits: 2 });
  });

  it('draws heavier edges wider, and falls back to sockets when nothing was measured', () => {
    const conn = (sent) => ({ sockets: 1, traffic: { bytes_sent: sent, bytes_received: 0 } });
    expect([0, 999, 1000, 10_000, 1e6, 1e12].map((b) => edgeWidth([conn(b)]))).toEqual([1, 1, 2, 3, 5, 8]);
    const unmeasured = fold(raw(undefined));
    const [edge] = [...unmeasured.edges.values()];
    expect(edge.conns[0].traffic).toBeNull();
    expect(edgeTraffic(edge.conns)).toBeNull();
    expect(connText(edge.conns[0])).toBe('5432/tcp psql ×2');
    expect(edgeWidth(edge.conns)).toBeCloseTo(1.2 + Math.log2(3) * 0.6);
  });

  it('formats bytes and round-trip times as tapgraphctl does', () => {
    expect([0, 999, 1000, 999949, 999950, 12345678901].map(bytes)).toEqual(['0 B', '999 B', '1.0 kB', '999.9 kB', '1.0 MB', '12.3 GB']);
    expect([0, 850, 10400, 1300000].map(rtt)).toEqual(['–', '850 µs', '10.4 ms', '1.3 s']);
  });
});
