'use strict';
// A JsSIP user agent under node: the WebSocket phone that nobody in this project wrote, for
// tests/integration/test_jssip.py. It registers over the given ws:/wss: URL, lets JsSIP refresh the
// binding, and rejects every incoming call with 486 RING seconds (default 0) after JsSIP has sent its 180:
// node has no RTCPeerConnection, so no call can be answered with media. One JSON object per line on
// stdout for each event; JsSIP's own debug log on stderr.
//
//   node phone.js URL AOR [EXPIRES [RING]]   (or PHONE_URL, PHONE_AOR, PHONE_EXPIRES, PHONE_RING)
//
// The packages are found through NODE_PATH (tests/support/jssip.py installs them into a cache).

const WebSocketBase = require('ws');

function emit(event, fields) {
  process.stdout.write(`${JSON.stringify({ event, t: Date.now() / 1000, ...fields })}\n`);
}

// First line, CSeq and Call-ID of a SIP message: enough to follow the dialogue without the whole text.
function summary(text) {
  const head = String(text).split('\r\n\r\n', 1)[0].split('\r\n');
  const header = (name) => {
    const re = new RegExp(`^(?:${name}):\\s*(.*)$`, 'i');
    const line = head.find((l) => re.test(l));
    return line === undefined ? null : line.match(re)[1];
  };
  return { line: head[0], cseq: header('CSeq'), call_id: header('Call-ID|i') };
}

// JsSIP opens its socket with the browser's WebSocket global, which node 20 lacks: ws stands in for it,
// and every frame is logged both ways so that the test sees each REGISTER refresh and its answer.
class LoggedWebSocket extends WebSocketBase {
  constructor(url, protocols) {
    super(url, protocols);
    this.on('open', () => emit('socket_open', { url, protocol: this.protocol }));
    this.on('message', (data) => emit('sip_in', summary(data)));
    this.on('close', (code) => emit('socket_close', { code }));
    this.on('error', (err) => emit('socket_error', { message: err.message }));
  }

  send(data, ...rest) {
    emit('sip_out', summary(data));
    return super.send(data, ...rest);
  }
}
globalThis.WebSocket = LoggedWebSocket;

// JsSIP refuses an incoming INVITE with 488 unless window.RTCPeerConnection exists. It only constructs
// one to answer or to call out, which this phone never does: the stand-in throws if that ever changes.
globalThis.window = globalThis;
globalThis.RTCPeerConnection = class RTCPeerConnection {
  constructor() {
    throw new Error('no RTCPeerConnection under node: this phone cannot answer with media');
  }
};

// JsSIP's loggers bind console.info, which writes to stdout, when it loads: make it write to stderr first,
// leaving stdout to the events.
console.info = console.error;
const JsSIP = require('jssip');

const [url, aor, expiresArg] = [
  process.argv[2] || process.env.PHONE_URL,
  process.argv[3] || process.env.PHONE_AOR,
  process.argv[4] || process.env.PHONE_EXPIRES || '60',
];
const ringMs = Number(process.argv[5] || process.env.PHONE_RING || '0') * 1000;
if (!url || !aor) {
  process.stderr.write('usage: node phone.js URL AOR [EXPIRES [RING]]\n');
  process.exit(2);
}
const expires = Number(expiresArg);

JsSIP.debug.enable('JsSIP:*');

const ua = new JsSIP.UA({
  sockets: [new JsSIP.WebSocketInterface(url)],
  uri: aor,
  register: true,
  register_expires: expires,
  // Retry a lost connection every 2 s (JsSIP backs off up to 30 s by default), so it shows in the events.
  connection_recovery_min_interval: 2,
  connection_recovery_max_interval: 2,
  user_agent: `JsSIP ${JsSIP.version} (node ${process.version})`,
});

ua.on('connected', () => emit('connected', { url }));
ua.on('disconnected', (e) => emit('disconnected', { error: Boolean(e && e.error), code: e && e.code }));
ua.on('registered', (e) =>
  emit('registered', { status: e.response.status_code, contact: e.response.getHeader('Contact') }),
);
ua.on('unregistered', (e) => emit('unregistered', { status: e.response ? e.response.status_code : null }));
ua.on('registrationFailed', (e) =>
  emit('registrationFailed', { cause: e.cause, status: e.response ? e.response.status_code : null }),
);

ua.on('newRTCSession', ({ originator, session, request }) => {
  emit('newRTCSession', {
    originator,
    request_line: `${request.method} ${request.ruri} SIP/2.0`,
    from: request.getHeader('From'),
    to: request.getHeader('To'),
    call_id: request.call_id,
  });
  if (originator !== 'remote') return;
  // JsSIP replies 180 itself right after this handler returns, then reports it as local progress.
  session.on('progress', ({ originator: who }) => {
    emit('progress', { originator: who, call_id: request.call_id });
    if (who === 'local') {
      setTimeout(() => {
        if (session.isEnded()) return;
        session.terminate({ status_code: 486 });
        emit('rejected', { status: 486, call_id: request.call_id });
      }, ringMs);
    }
  });
  session.on('failed', ({ originator: who, cause }) =>
    emit('failed', { originator: who, cause, call_id: request.call_id }),
  );
});

function shutdown(signal) {
  emit('stopping', { signal });
  // Unregister and close; exit in any case soon after, so the test's stop by PID never waits long.
  ua.once('unregistered', () => process.exit(0));
  ua.once('disconnected', () => process.exit(0));
  ua.stop();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));

emit('start', { url, aor, expires, jssip: JsSIP.version, ws: require('ws/package.json').version });
ua.start();
