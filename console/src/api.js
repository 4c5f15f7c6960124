// The controller's read-only API, same origin, relative to the page so the console also works under a
// path prefix. A 401 anywhere means the access cookie is missing or expired: the console says how to get
// one and stops.

export class Unauthorized extends Error {}

const listeners = new Set();
let denied = false;

/** Called once, with no arguments, when the controller answers 401. */
export function onUnauthorized(fn) {
  listeners.add(fn);
}

export function isDenied() {
  return denied;
}

function deny() {
  if (denied) return;
  denied = true;
  for (const fn of listeners) fn();
}

async function get(path) {
  if (denied) throw new Unauthorized(path);
  const res = await fetch(path, { headers: { accept: 'application/json' }, credentials: 'same-origin', cache: 'no-store' });
  if (res.status === 401) {
    deny();
    throw new Unauthorized(path);
  }
  if (!res.ok) throw new Error(`${path}: HTTP ${res.status}`);
  return res.json();
}

export const api = {
  graph: () => get('api/v1/graph'),
  agents: () => get('api/v1/agents'),
  mirror: () => get('api/v1/mirror'),
  policies: () => get('api/v1/policies'),
  history: () => get('api/v1/history'),
};

/**
 * Subscribes to the controller's server-sent events: handlers.graph({generation}), handlers.fleet(),
 * handlers.event(event), handlers.status('live'|'reconnecting'). EventSource reconnects by itself.
 * Returns a function that closes the stream.
 */
export function subscribe(handlers) {
  const es = new EventSource('api/v1/events');
  const parse = (m) => {
    try {
      return JSON.parse(m.data);
    } catch {
      return {};
    }
  };
  es.addEventListener('open', () => handlers.status?.('live'));
  es.addEventListener('error', () => {
    handlers.status?.(es.readyState === EventSource.CLOSED ? 'closed' : 'reconnecting');
    // An expired cookie shows up here as a failed reconnect; a plain GET tells 401 apart.
    get('api/v1/agents').catch(() => {});
  });
  es.addEventListener('graph', (m) => handlers.graph?.(parse(m)));
  es.addEventListener('fleet', (m) => handlers.fleet?.(parse(m)));
  es.addEventListener('event', (m) => handlers.event?.(parse(m)));
  return () => es.close();
}
