// The HTTP API: JSON in, JSON out, {"error": {code, message}} on failure.

export class ApiError extends Error {
  constructor(status, code, message, details = {}) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
    // The error object's other fields (e.g. `unknown` devices of an epoch upload).
    this.details = details;
  }
}

const CODE_BY_STATUS = {
  400: 'bad_request',
  401: 'unauthorized',
  403: 'forbidden',
  404: 'not_found',
  409: 'conflict',
  413: 'too_large',
  429: 'rate_limited',
  503: 'unavailable',
};

/**
 * Call the API. Throws ApiError (status 0 and code "network" when the server
 * cannot be reached).
 */
export async function api(path, { method = 'GET', body, token, signal } = {}) {
  const headers = { Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (token) headers.Authorization = `Bearer ${token}`;
  let res;
  try {
    res = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: 'no-store',
    });
  } catch (err) {
    if (err && err.name === 'AbortError') throw err;
    throw new ApiError(0, 'network', 'The server cannot be reached. Check your connection.');
  }
  let data = null;
  try {
    data = await res.json();
  } catch {
    data = null;
  }
  if (!res.ok) {
    const e = data && data.error;
    const code = (e && e.code) || CODE_BY_STATUS[res.status] || (res.status >= 500 ? 'internal' : 'bad_request');
    const { code: _c, message: _m, ...details } = e || {};
    throw new ApiError(res.status, code, (e && e.message) || res.statusText || `HTTP ${res.status}`, details);
  }
  return data;
}
