import { describe, expect, it } from 'vitest';
import { controllerText, mirrorByAgent } from '../src/fleet.js';
import { ago, si, ms } from '../src/format.js';
import { colourScale, colourOf, NO_VALUE, PALETTE } from '../src/colours.js';
import { mirror } from '../dev/fixture.js';

describe('mirrorByAgent', () => {
  it('sums loss and drops over targets and keeps the worst p99', () => {
    const rows = [
      ...mirror(),
      { agent: 'web-3', target: 'vxlan:10.0.0.9', batches_lost: 2, lost_in_transit: 6, dropped: { unavailable: 5 }, delay_p99_us: 20_000 },
    ];
    const m = mirrorByAgent(rows);
    expect(m.get('web-1')).toMatchObject({ lost: 0, batchesLost: 0, dropped: 0, delayP99us: 4000 });
    expect(m.get('web-3')).toMatchObject({ lost: 70, batchesLost: 3, dropped: 25, delayP99us: 20_000 });
    expect(m.get('web-3').targets).toHaveLength(2);
    expect(mirrorByAgent(null).size).toBe(0);
  });
});

describe('controllerText', () => {
  it('names the replica holding the session, a dash without one', () => {
    expect(controllerText({ controller: 'ctl-b' })).toBe('ctl-b');
    expect(controllerText({ controller: '' })).toBe('–');
    expect(controllerText({})).toBe('–');
  });
});

describe('format', () => {
  it('says how long ago', () => {
    expect(ago(0)).toBe('never');
    expect(ago(10_000, 12_000)).toBe('2 s ago');
    expect(ago(0 + 1, 1 + 125_000)).toBe('2 min ago');
    expect(ago(1, 1 + 7_300_000)).toBe('2 h ago');
    expect(ago(1, 1 + 3 * 86_400_000)).toBe('3 d ago');
    expect(ago(5000, 1000)).toBe('0 s ago');
  });

  it('abbreviates and signs', () => {
    expect(si(850.5)).toBe('851');
    expect(si(12_345)).toBe('12.3 k');
    expect(si(6_100_000)).toBe('6.10 M');
    expect(si(null)).toBe('–');
    expect(ms(null)).toBe('–');
    expect(ms(0.374, true)).toBe('+0.37 ms');
    expect(ms(-1.85, true)).toBe('-1.85 ms');
    expect(ms(42.25)).toBe('42.3 ms');
  });
});

describe('colours', () => {
  it('gives each value a stable colour in sorted order, grey without the label', () => {
    const nodes = [{ labels: { role: 'web' } }, { labels: { role: 'db' } }, { labels: {} }];
    const scale = colourScale(nodes, 'role');
    expect([...scale.keys()]).toEqual(['db', 'web']);
    expect(colourOf(nodes[0], 'role', scale)).toBe(PALETTE[1]);
    expect(colourOf(nodes[2], 'role', scale)).toBe(NO_VALUE);
    expect(colourOf(nodes[0], '', scale)).toBe(NO_VALUE);
  });
});
