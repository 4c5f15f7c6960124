// The policies page: what applies to whom, and how far each agent got. Read-only.
import { el } from './format.js';

export function createPolicies(root) {
  const ptbody = root.querySelector('#policies-table tbody');
  const rtbody = root.querySelector('#rollout-table tbody');

  function spec(s) {
    const entries = Object.entries(s || {}).sort();
    if (!entries.length) return el('span', { class: 'muted' }, '(defaults)');
    return el('ul', { class: 'kv' }, entries.map(([k, v]) => el('li', {}, el('code', {}, `${k} = ${typeof v === 'string' ? v : JSON.stringify(v)}`))));
  }

  return {
    set(data) {
      const policies = (data && data.policies) || (Array.isArray(data) ? data : []);
      const rollout = (data && data.rollout) || [];
      ptbody.replaceChildren(
        ...(policies.length
          ? policies.map((p) =>
              el(
                'tr',
                { dataset: { policy: p.name } },
                el('td', {}, el('strong', {}, p.name)),
                el('td', {}, el('code', {}, p.selector ?? '')),
                el('td', { class: 'r' }, `v${p.version}`),
                el('td', {}, spec(p.spec)),
                // The built-in default policy was never updated: its time is the epoch.
                el('td', { class: 'muted' }, [p.updated_by, p.updated_at && !String(p.updated_at).startsWith('1970-') ? p.updated_at : null].filter(Boolean).join(' · ') || 'built in'),
              ),
            )
          : [el('tr', {}, el('td', { colspan: '5', class: 'muted' }, 'No policy is set.'))]),
      );
      rtbody.replaceChildren(
        ...(rollout.length
          ? rollout.map((r) => {
              const behind = r.version_applied !== r.version_wanted;
              return el(
                'tr',
                { dataset: { agent: r.agent_id, state: r.state ?? '' }, class: r.error ? 'refused' : behind ? 'pending' : '' },
                el('td', {}, el('code', {}, r.agent_id)),
                el('td', {}, r.policy ?? ''),
                el('td', { class: 'r' }, `v${r.version_wanted}`),
                el('td', { class: `r${behind ? ' mismatch' : ''}` }, r.version_applied === null || r.version_applied === undefined ? '–' : `v${r.version_applied}`),
                el('td', {}, el('span', { class: `badge rollout-${String(r.state || '').replace(/[^a-z_-]/gi, '')}` }, r.state ?? '')),
                el('td', { class: 'error' }, r.error || ''),
              );
            })
          : [el('tr', {}, el('td', { colspan: '6', class: 'muted' }, 'No agent has been sent a policy yet.'))]),
      );
    },
  };
}
