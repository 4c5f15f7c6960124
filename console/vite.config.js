// The console's build: `npm run build` writes dist/ (index.html + assets/), which the controller embeds
// and serves at `/`. `npm run dev` serves the console with the API proxied to a controller
// (TAPGRAPH_API=http://127.0.0.1:7080) or, without one, answered from the fixtures in dev/.
import { defineConfig } from 'vite';

const CSP =
  "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; " +
  "font-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/** Answers /api/v1/* from dev/fixture.js; the map gains an endpoint every 15 s (a live update). */
function fixtures() {
  return {
    name: 'tapgraph-fixtures',
    configureServer: (server) => serveFixtures(server),
    configurePreviewServer: (server) => serveFixtures(server),
  };
}

async function serveFixtures(server) {
      const f = await import('./dev/fixture.js');
      let generation = 12;
      const clients = new Set();
      setInterval(() => {
        generation = generation === 12 ? 13 : 12;
        for (const res of clients) res.write(`event: graph\ndata: {"generation":${generation}}\n\n`);
      }, 15_000).unref();
      setInterval(() => {
        for (const res of clients) res.write('event: fleet\ndata: {}\n\n');
      }, 5_000).unref();
      server.middlewares.use((req, res, next) => {
        const url = new URL(req.url, 'http://x');
        const json = (v) => {
          res.setHeader('content-type', 'application/json');
          res.end(JSON.stringify(v));
        };
        switch (url.pathname) {
          case '/api/v1/graph':
            return json(f.graph(generation));
          case '/api/v1/agents':
            return json(f.agents());
          case '/api/v1/mirror':
            return json(f.mirror());
          case '/api/v1/policies':
            return json(f.policies());
          case '/api/v1/graph/export':
            res.setHeader('content-disposition', 'attachment; filename="tapgraph.json"');
            return json(f.graph(generation));
          case '/api/v1/events':
            res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
            res.write(': hello\n\n');
            clients.add(res);
            req.on('close', () => clients.delete(res));
            return undefined;
          default:
            return next();
        }
      });
}

export default defineConfig(() => {
  const target = process.env.TAPGRAPH_API;
  const proxy = target ? { '/api': { target, changeOrigin: false } } : undefined;
  return {
    base: './',
    plugins: target ? [] : [fixtures()],
    build: {
      outDir: 'dist',
      emptyOutDir: true,
      assetsDir: 'assets',
      // cytoscape is ~400 kB minified; one chunk is fine for a console that loads once.
      chunkSizeWarningLimit: 1024,
      modulePreload: { polyfill: false },
    },
    server: { host: '127.0.0.1', port: 5173, strictPort: true, proxy, headers: { 'content-security-policy': CSP.replace("script-src 'self'", "script-src 'self' 'unsafe-inline'") } },
    preview: { host: '127.0.0.1', port: 4173, strictPort: true, proxy, headers: { 'content-security-policy': CSP } },
    test: { include: ['test/**/*.test.js'], environment: 'node' },
  };
});
