// HTTP calls to /api/v1 (docs/PROTOCOL.md). Errors become ApiError with the
// server's `code` and human `message`; the token travels only in the
// Authorization header, never in a URL.

import { t } from './i18n.js';

export class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

export class Api {
  constructor() {
    this.token = null;
    /** Called when an authenticated call answers 401 (token expired or revoked). */
    this.onUnauthorized = null;
  }

  async call(method, path, body) {
    const headers = {};
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let resp;
    try {
      resp = await fetch(`/api/v1${path}`, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: 'no-store',
        credentials: 'omit',
      });
    } catch {
      throw new ApiError(0, 'network', t('err_network'), null);
    }
    const text = await resp.text().catch(() => '');
    let data = null;
    if (text) {
      try {
        data = JSON.parse(text);
      } catch {
        data = null;
      }
    }
    if (!resp.ok) {
      const err = (data && data.error) || {};
      const retry = Number(resp.headers.get('Retry-After')) || null;
      const e = new ApiError(resp.status, err.code || `http_${resp.status}`, err.message || resp.statusText || `HTTP ${resp.status}`, retry);
      if (resp.status === 401 && this.token && this.onUnauthorized) this.onUnauthorized(e);
      throw e;
    }
    return data;
  }

  get(path) {
    return this.call('GET', path);
  }

  /** A file from the API as a Blob (the token still only in the header). */
  async download(path) {
    let resp;
    try {
      resp = await fetch(`/api/v1${path}`, {
        headers: { Authorization: `Bearer ${this.token}` },
        cache: 'no-store',
        credentials: 'omit',
      });
    } catch {
      throw new ApiError(0, 'network', t('err_network'), null);
    }
    if (!resp.ok) {
      const data = await resp.json().catch(() => null);
      const err = (data && data.error) || {};
      throw new ApiError(resp.status, err.code || `http_${resp.status}`, err.message || `HTTP ${resp.status}`, null);
    }
    return resp.blob();
  }

  post(path, body) {
    return this.call('POST', path, body ?? {});
  }

  put(path, body) {
    return this.call('PUT', path, body ?? {});
  }

  del(path) {
    return this.call('DELETE', path);
  }
}

/** A message for people, for an error from the API. */
export function explain(err) {
  if (!(err instanceof ApiError)) return String(err && err.message ? err.message : err);
  switch (err.code) {
    case 'username_taken':
      return t('err_username_taken');
    case 'invalid_credentials':
      return t('err_invalid_credentials');
    case 'rate_limited':
      return t('err_rate_limited', { secs: err.retryAfter || 60 });
    default:
      return err.message;
  }
}
