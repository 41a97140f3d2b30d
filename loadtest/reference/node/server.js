// REFERENCE — not chatd, not for production.
//
// A benchmark yardstick for loadtest/bench.py: "the stack chatd replaces",
// written the way a Node chat relay usually is: socket.io 4 on Node's http
// server, @socket.io/redis-adapter (redis v4 pub + sub clients) to fan out
// between instances, and nothing else. Per message it relays and emits
// receipts; it stores nothing, encrypts nothing, queues nothing for offline
// users. See README.md next to this file for the full list of what it leaves
// out compared with chatd.
//
// Wire protocol: the same as loadtest/reference/server.py (python-socketio),
// so loadtest/driver.py --impl sio drives both unchanged:
//   client -> server  send {type,cid,to,body}   ack {type,ids} | {type,receipts}
//                     seen {type,ids}
//   server -> client  ready {type,user,node}    sent {type,cid,id,conversation,seq,ts}
//                     message {type,id,conversation,seq,from,body,ts}
//                     receipt {type,rid,id,conversation,status,by,ts}
//                     error {type,code,message,cid?}
// HTTP: POST /api/register, POST /api/login (JWT HS256), GET /healthz, /readyz.
// Socket.IO is served at /ws (no trailing slash needed), WebSocket transport only.
//
// Run: node server.js --port P --secret S [--redis-url redis://127.0.0.1:PORT]
//                     [--node ref1] [--host 127.0.0.1]
// Logs only warnings and errors; exits cleanly on SIGTERM / SIGINT.

"use strict";

const crypto = require("node:crypto");
const http = require("node:http");
const { parseArgs, promisify } = require("node:util");
const { Server } = require("socket.io");

const MAX_BODY = 4000; // characters in a message body, as chatd
const MAX_CID = 64; // characters in a client message id, as chatd
const MAX_IDS = 1000; // ids per ack / seen frame
const MAX_HTTP_BODY = 64 * 1024; // bytes, as chatd's API and the NGINX config
const TOKEN_TTL = 3600; // seconds
const MESSAGE_TTL = 600; // seconds a message's sender is remembered for its receipts
const MEMORY_MESSAGES_MAX = 2_000_000; // bound on the in-memory map (no --redis-url)
const USERNAME = /^[a-z0-9_.-]{3,32}$/; // chatd's rule (chatd/core/names.py)

const scrypt = promisify(crypto.scrypt);

// -- command line ----------------------------------------------------------------------

function cli() {
  const usage =
    "usage: node server.js --port P --secret S [--redis-url URL] [--node NAME] [--host HOST]";
  let values;
  try {
    ({ values } = parseArgs({
      options: {
        port: { type: "string" },
        secret: { type: "string" },
        "redis-url": { type: "string", default: "" },
        node: { type: "string", default: "ref1" },
        host: { type: "string", default: "127.0.0.1" },
        help: { type: "boolean", short: "h", default: false },
      },
    }));
  } catch (err) {
    console.error(`${err.message}\n${usage}`);
    process.exit(2);
  }
  if (values.help) {
    console.log(`${usage}\n\nREFERENCE for loadtest/bench.py (socket.io 4 + redis adapter), not chatd.`);
    process.exit(0);
  }
  const port = Number(values.port);
  if (!Number.isInteger(port) || port < 0 || port > 65535 || !values.secret) {
    console.error(usage);
    process.exit(2);
  }
  return { port, secret: values.secret, redisUrl: values["redis-url"], node: values.node,
    host: values.host };
}

// -- small helpers ------------------------------------------------------------------------

/** A message id that sorts by creation time, like a ULID: 13 hex digits of ms, 12 random. */
function newId() {
  return Date.now().toString(16).padStart(13, "0") + crypto.randomBytes(6).toString("hex");
}

/** The one-to-one conversation of a and b: "dm:<first>:<second>", names sorted. */
function dmId(a, b) {
  return a < b ? `dm:${a}:${b}` : `dm:${b}:${a}`;
}

function isObject(v) {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function stringList(v) {
  return Array.isArray(v) ? v.filter((s) => typeof s === "string").slice(0, MAX_IDS) : [];
}

// -- passwords (scrypt, Node's built-in, async on libuv's thread pool) --------------------

async function hashPassword(password) {
  const salt = crypto.randomBytes(16);
  const key = await scrypt(password, salt, 32);
  return `scrypt$${salt.toString("base64")}$${key.toString("base64")}`;
}

async function checkPassword(password, stored) {
  const [scheme, salt, key] = String(stored).split("$");
  if (scheme !== "scrypt" || !salt || !key) return false;
  const expected = Buffer.from(key, "base64");
  const got = await scrypt(password, Buffer.from(salt, "base64"), expected.length);
  return crypto.timingSafeEqual(got, expected);
}

// -- JWT HS256 with crypto.createHmac (claims sub, iat, exp) ------------------------------

function b64json(obj) {
  return Buffer.from(JSON.stringify(obj)).toString("base64url");
}

function signToken(secret, sub) {
  const now = Math.floor(Date.now() / 1000);
  const claims = { sub, iat: now, exp: now + TOKEN_TTL };
  const head = `${b64json({ alg: "HS256", typ: "JWT" })}.${b64json(claims)}`;
  return `${head}.${crypto.createHmac("sha256", secret).update(head).digest("base64url")}`;
}

/** The token's claims if it is a valid, unexpired HS256 token with a string sub; else null. */
function verifyToken(secret, token) {
  if (typeof token !== "string") return null;
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  const expected = crypto.createHmac("sha256", secret).update(`${parts[0]}.${parts[1]}`).digest();
  const given = Buffer.from(parts[2], "base64url");
  if (given.length !== expected.length || !crypto.timingSafeEqual(given, expected)) return null;
  try {
    const header = JSON.parse(Buffer.from(parts[0], "base64url").toString());
    const claims = JSON.parse(Buffer.from(parts[1], "base64url").toString());
    if (header.alg !== "HS256" || typeof claims.sub !== "string") return null;
    if (typeof claims.exp !== "number" || claims.exp <= Date.now() / 1000) return null;
    return claims;
  } catch {
    return null;
  }
}

// -- shared state: users and "who sent message <id>" -------------------------------------
//
// Two implementations with the same methods. In Redis (several instances):
//   HASH ref:users   name -> password hash
//   STRING ref:m:<id> "<sender>|<conversation>" EX 600   (the only per-message key)
// The second exists because a receipt must reach the message's sender, and the
// recipient's ack may arrive at another instance than the one that relayed the
// message; the driver's ack carries only ids.

class MemoryState {
  constructor() {
    this.users = new Map(); // name -> password hash
    this.messages = new Map(); // id -> [value, expiry ms]; insertion order = age
  }

  async createUser(name, hash) {
    if (this.users.has(name)) return false;
    this.users.set(name, hash);
    return true;
  }

  async passwordHash(name) {
    return this.users.get(name) ?? null;
  }

  async userExists(name) {
    return this.users.has(name);
  }

  async remember(id, value) {
    const now = Date.now();
    // drop expired (and, past the bound, oldest) entries from the front
    for (const [key, [, expiry]] of this.messages) {
      if (expiry > now && this.messages.size < MEMORY_MESSAGES_MAX) break;
      this.messages.delete(key);
    }
    this.messages.set(id, [value, now + MESSAGE_TTL * 1000]);
  }

  async lookup(ids) {
    const now = Date.now();
    return ids.map((id) => {
      const entry = this.messages.get(id);
      return entry && entry[1] > now ? entry[0] : null;
    });
  }
}

class RedisState {
  constructor(client) {
    this.redis = client;
  }

  async createUser(name, hash) {
    return Boolean(await this.redis.hSetNX("ref:users", name, hash));
  }

  async passwordHash(name) {
    return this.redis.hGet("ref:users", name);
  }

  async userExists(name) {
    return Boolean(await this.redis.hExists("ref:users", name));
  }

  async remember(id, value) {
    await this.redis.set(`ref:m:${id}`, value, { EX: MESSAGE_TTL });
  }

  async lookup(ids) {
    return this.redis.mGet(ids.map((id) => `ref:m:${id}`)); // one round trip per frame
  }
}

// -- HTTP API ------------------------------------------------------------------------------

class HttpError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function reply(res, status, body) {
  const data = JSON.stringify(body);
  res.writeHead(status, {
    "Content-Type": "application/json",
    "Content-Length": Buffer.byteLength(data),
    ...(status === 413 ? { Connection: "close" } : {}),
  });
  res.end(data);
}

function readJson(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on("data", (chunk) => {
      size += chunk.length;
      if (size > MAX_HTTP_BODY) {
        // stop reading; the 413 goes out with "Connection: close" (see reply)
        req.removeAllListeners("data");
        req.pause();
        reject(new HttpError(413, "too_large", "request body too large"));
        return;
      }
      chunks.push(chunk);
    });
    req.on("error", reject);
    req.on("end", () => {
      try {
        const body = JSON.parse(Buffer.concat(chunks).toString("utf8"));
        if (!isObject(body)) throw new Error("not an object");
        resolve(body);
      } catch {
        reject(new HttpError(400, "bad_request", "the body must be a JSON object"));
      }
    });
  });
}

// -- the server ------------------------------------------------------------------------------

async function main() {
  const args = cli();
  const stats = { messages: 0, receipts: 0, receiptAcks: 0 };
  const knownUsers = new Set(); // users are never deleted, so a cache needs no invalidation
  const seqs = new Map(); // conversation -> last seq: SIMPLIFICATION, see README

  // Redis: the adapter's pub client also serves our few commands (users, ref:m:<id>);
  // the sub client is in subscribed mode and belongs to the adapter.
  let state = new MemoryState();
  let adapter;
  const redisClients = [];
  if (args.redisUrl) {
    const { createClient } = require("redis");
    const { createAdapter } = require("@socket.io/redis-adapter");
    const pub = createClient({ url: args.redisUrl });
    const sub = pub.duplicate();
    for (const [name, client] of [["pub", pub], ["sub", sub]]) {
      // the client reconnects by itself (commands wait meanwhile); warn at most every 5 s
      let warned = 0;
      client.on("error", (err) => {
        if (Date.now() - warned < 5000) return;
        warned = Date.now();
        console.warn(`[${args.node}] redis ${name}: ${err.message}`);
      });
      redisClients.push(client);
    }
    // at start-up, a Redis that is not there is a configuration error: fail fast
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`no Redis at ${args.redisUrl} after 10 s`)), 10000);
    });
    await Promise.race([Promise.all([pub.connect(), sub.connect()]), timeout]);
    clearTimeout(timer);
    adapter = createAdapter(pub, sub);
    state = new RedisState(pub);
  }

  async function userExists(name) {
    if (knownUsers.has(name)) return true;
    const exists = await state.userExists(name);
    if (exists) knownUsers.add(name);
    return exists;
  }

  async function register(body) {
    const name = typeof body.username === "string" ? body.username.toLowerCase() : "";
    const { password } = body;
    if (!USERNAME.test(name) || typeof password !== "string" || password.length < 8
        || password.length > 1024) {
      throw new HttpError(400, "bad_request", "bad username or password");
    }
    if (!(await state.createUser(name, await hashPassword(password)))) {
      throw new HttpError(409, "conflict", "username taken");
    }
    knownUsers.add(name);
    return [201, { username: name }];
  }

  async function login(body) {
    const name = typeof body.username === "string" ? body.username.toLowerCase() : "";
    const password = typeof body.password === "string" ? body.password : "";
    const stored = USERNAME.test(name) ? await state.passwordHash(name) : null;
    if (!stored || !(await checkPassword(password, stored))) {
      throw new HttpError(401, "unauthorized", "wrong username or password");
    }
    return [200, { token: signToken(args.secret, name), expires_in: TOKEN_TTL }];
  }

  // socket.io takes over the requests under /ws; everything else comes here
  async function onRequest(req, res) {
    const path = req.url.split("?", 1)[0];
    try {
      let result;
      if (req.method === "GET" && (path === "/healthz" || path === "/readyz")) {
        result = [200, { status: "ok", node: args.node, stats }];
      } else if (req.method === "POST" && path === "/api/register") {
        result = await register(await readJson(req));
      } else if (req.method === "POST" && path === "/api/login") {
        result = await login(await readJson(req));
      } else {
        throw new HttpError(404, "not_found", "no such endpoint");
      }
      reply(res, ...result);
    } catch (err) {
      if (!(err instanceof HttpError)) console.error(`[${args.node}] ${req.method} ${path}:`, err);
      const e = err instanceof HttpError ? err : new HttpError(500, "internal", "internal error");
      if (!res.headersSent && !res.destroyed) {
        reply(res, e.status, { error: { code: e.code, message: e.message } });
      }
    }
  }

  const httpServer = http.createServer((req, res) => void onRequest(req, res));
  const io = new Server(httpServer, {
    path: "/ws",
    // socket.io's default path matching wants "/ws/"; the driver and NGINX
    // ("location = /ws") use "/ws?EIO=4&transport=websocket"
    addTrailingSlash: false,
    transports: ["websocket"],
    serveClient: false,
    maxHttpBufferSize: 64 * 1024,
    ...(adapter ? { adapter } : {}),
  });

  // -- Socket.IO ---------------------------------------------------------------------------

  // connect: the auth payload ({token}) must carry a valid JWT of a known user
  io.use((socket, next) => {
    const token = isObject(socket.handshake.auth) ? socket.handshake.auth.token : undefined;
    const claims = verifyToken(args.secret, token);
    if (!claims) {
      next(new Error("unauthorized"));
      return;
    }
    userExists(claims.sub).then(
      (exists) => {
        socket.data.user = claims.sub;
        next(exists ? undefined : new Error("unauthorized"));
      },
      (err) => {
        console.error(`[${args.node}] connect:`, err);
        next(new Error("unavailable"));
      },
    );
  });

  function sendError(socket, code, message, cid) {
    const frame = { type: "error", code, message };
    if (typeof cid === "string") frame.cid = cid;
    socket.emit("error", frame);
  }

  async function onSend(socket, data) {
    const user = socket.data.user;
    if (!isObject(data)) return;
    const { cid, to, body } = data;
    if (typeof cid !== "string" || cid.length < 1 || cid.length > MAX_CID
        || typeof body !== "string" || body.length > MAX_BODY) {
      sendError(socket, "bad_request", "bad send", cid);
      return;
    }
    if (typeof to !== "string" || to === user || !(knownUsers.has(to) || await userExists(to))) {
      sendError(socket, "not_found", "no such user", cid);
      return;
    }
    const conversation = dmId(user, to);
    const id = newId();
    const ts = Date.now();
    // SIMPLIFICATION: seq counts per conversation in this process only (no store).
    const seq = (seqs.get(conversation) ?? 0) + 1;
    seqs.set(conversation, seq);
    // so that ack / seen on any instance can find who to send the receipt to
    await state.remember(id, `${user}|${conversation}`);
    stats.messages += 1;
    socket.emit("sent", { type: "sent", cid, id, conversation, seq, ts });
    const message = { type: "message", id, conversation, seq, from: user, body, ts };
    io.to(`u:${to}`).emit("message", message); // the recipient's devices, any instance
    socket.to(`u:${user}`).emit("message", message); // the sender's other devices
  }

  /** ack {ids} -> "delivered" receipts, seen {ids} -> "seen" receipts; ack {receipts}: counted. */
  async function onMark(socket, data, status) {
    const user = socket.data.user;
    if (!isObject(data)) return;
    stats.receiptAcks += stringList(data.receipts).length; // no store: nothing to mark
    const ids = stringList(data.ids);
    if (ids.length === 0) return;
    const found = await state.lookup(ids);
    const ts = Date.now();
    ids.forEach((id, i) => {
      const value = found[i];
      if (!value) return; // unknown or older than MESSAGE_TTL
      const bar = value.indexOf("|");
      const sender = value.slice(0, bar);
      const conversation = value.slice(bar + 1);
      if (sender === user || dmId(user, sender) !== conversation) return; // not its recipient
      stats.receipts += 1;
      io.to(`u:${sender}`).emit("receipt", {
        type: "receipt",
        rid: `${id}/${user}/${status[0]}`,
        id,
        conversation,
        status,
        by: user,
        ts,
      });
    });
  }

  function handler(socket, fn, ...rest) {
    return (data) => {
      fn(socket, data, ...rest).catch((err) => {
        console.error(`[${args.node}] ${fn.name}:`, err);
        sendError(socket, "internal", "internal error", isObject(data) ? data.cid : undefined);
      });
    };
  }

  io.on("connection", (socket) => {
    const user = socket.data.user; // set by the middleware above
    socket.join(`u:${user}`);
    socket.emit("ready", { type: "ready", user, node: args.node });
    socket.on("send", handler(socket, onSend));
    socket.on("ack", handler(socket, onMark, "delivered"));
    socket.on("seen", handler(socket, onMark, "seen"));
  });

  // -- start and stop ------------------------------------------------------------------------

  httpServer.on("error", (err) => {
    console.error(`[${args.node}] http server: ${err.message}`);
    process.exit(1);
  });
  httpServer.listen({ port: args.port, host: args.host, backlog: 4096 });

  let stopping = false;
  async function shutdown() {
    if (stopping) return;
    stopping = true;
    setTimeout(() => process.exit(1), 5000).unref(); // a wedged Redis must not hold us
    httpServer.closeAllConnections?.();
    await io.close(); // disconnects the sockets, closes the adapter and the http server
    await Promise.allSettled(redisClients.map((c) => c.quit()));
    process.exit(0);
  }
  process.on("SIGTERM", shutdown);
  process.on("SIGINT", shutdown);
}

main().catch((err) => {
  console.error("reference server failed to start:", err);
  process.exit(1);
});
