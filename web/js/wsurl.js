// How the page finds chatd's WebSocket (see docs/web.md).
//
// GET /api/info answers {node, version, http_port, ws_port, ws_path, ws_url}.
//  1. ws_url set by the operator: use it, resolved relative to the page
//     (so "/ws" works behind a proxy), with http→ws and https→wss.
//  2. Otherwise, if the page's own port is chatd's http_port, the page was
//     served by chatd directly: the WebSocket listens on ws_port of the same host.
//  3. Otherwise the page came through a proxy (NGINX …): same origin, ws_path.

const DEFAULT_PORTS = { 'http:': '80', 'https:': '443', 'ws:': '80', 'wss:': '443' };

function wsScheme(protocol) {
  if (protocol === 'https:' || protocol === 'wss:') return 'wss:';
  return 'ws:';
}

/**
 * @param {{http_port?: number, ws_port?: number, ws_path?: string, ws_url?: string|null}} info
 * @param {{href: string, protocol: string, hostname: string, host: string, port: string}} loc
 *   the page's location (window.location or anything shaped like it)
 * @returns {string} an absolute ws:// or wss:// URL
 */
export function resolveWsUrl(info, loc) {
  const path = info.ws_path || '/ws';
  if (info.ws_url) {
    const url = new URL(info.ws_url, loc.href);
    if (url.protocol === 'http:' || url.protocol === 'https:') url.protocol = wsScheme(url.protocol);
    return url.href;
  }
  const scheme = wsScheme(loc.protocol);
  const pagePort = loc.port || DEFAULT_PORTS[loc.protocol] || '';
  if (info.http_port != null && info.ws_port != null && String(info.http_port) === pagePort) {
    // location.hostname keeps the brackets of an IPv6 literal, so this stays valid.
    return `${scheme}//${loc.hostname}:${info.ws_port}${path}`;
  }
  return `${scheme}//${loc.host}${path}`;
}
