// Command poissongen is an open-loop SIP load generator for bench/poisson_bench.py (issue 14, item 3): it
// sends REGISTER refreshes of N distinct users over UDP with exponential (Poisson) inter-arrival times, times
// every answer on the monotonic clock and prints one JSON report on stdout, its own pacing error included.
//
//	poissongen -target 127.0.0.1:5060 -rate 8000 -duration 20 -users 10000 [-warmup] [-cseq-base 1]
//	poissongen -responder 127.0.0.1:5080      a trivial UDP stand-in answering 200 to every request
//
// Users. User i is sip:user{i}@DOMAIN with a Contact of its own (sip:user{i}@127.0.X.1:PORT, PORT and X
// derived from i), a Call-ID that only depends on i and -callid-tag (stable across runs), a From tag of its
// own and a CSeq that grows by one at each of its REGISTERs. User i always sends from socket i mod -sockets,
// so that its source address never changes (a refresh from another source is no refresh to a registrar):
// runs that follow each other name the same -local-ports.
//
// Phases. With -warmup, every user first sends one REGISTER (CSeq = -cseq-base), one after the other at
// -warmup-rate per second (evenly spaced); the phase ends when all are answered or -timeout after the last.
// Then, for -duration seconds, REGISTERs leave at the instants of a Poisson process of rate -rate: the
// schedule (cumulated exponential draws, seed -seed) is drawn before the phase starts, and the k-th REGISTER
// goes to user (F+k) mod N with F = -first-user (round robin: a user never has two REGISTERs in flight unless
// its answer is slower than N / rate seconds; the aggregate stream is Poisson whichever user each arrival
// belongs to). There are no retransmissions: a REGISTER with no final answer within -timeout of its sending
// is lost. A later run of the same users goes on where this one stopped with the report's "cseq_next" as
// -cseq-base and "first_user_next" as -first-user: each user's CSeq keeps growing, and every user is
// refreshed in turn even when one run sends fewer REGISTERs than there are users.
//
// Timing. One OS thread (timer slack 1 ns; SCHED_FIFO with -rt-priority) sleeps in nanosleep until each
// scheduled instant (or spins for the last -spin of it), stamps the monotonic clock and writes the prepared datagram with one write(2) on a
// connected socket. One thread per socket drains it every -recv-tick; each answer's time is the kernel's
// receive stamp (SO_TIMESTAMPNS), so neither the tick nor this program's own scheduling enters the figures.
// Latency is answer stamp minus send stamp. Sleeps, writes and reads are raw syscalls that keep the Go
// scheduler out of the way (see rawSleep). The pacing error is send stamp minus scheduled instant; the
// report also compares the actual inter-send gaps with the exponential distribution of the offered rate
// (Kolmogorov-Smirnov distance D, next to the same D of the drawn schedule itself, which is sampling noise
// only, and the 5 % critical value 1.36/sqrt(n)), gives their coefficient of variation (1 for an
// exponential) and the index of dispersion (variance / mean) of the counts sent per 1 ms and per 10 ms
// window (1 for a Poisson process). Percentiles are nearest-rank: the
// ceil(q/100 * n)-th smallest value, as tests/support/stats.py defines them.
//
// Matching. Each Via branch is z9hG4bK-RUNID-{w|m}K (RUNID random per run, K the request's index), so an
// answer names its request; its Call-ID and CSeq are checked against that request's too (a mismatch is
// counted, not timed). The first REGISTER and the first answer of each status code are also parsed with
// github.com/emiago/sipgo's parser and checked against this program's own reading ("sipgo_checks").
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/emiago/sipgo/sip"
)

const (
	prSetTimerslack = 29 // prctl(2)
	contactPortBase = 10000
	contactPorts    = 50000
)

var (
	clockStart  = time.Now()
	wallAtStart = clockStart.UnixNano() // CLOCK_REALTIME at clockStart: kernel stamps minus this are now()'s
)

// now is nanoseconds on the monotonic clock since the program started.
func now() int64 { return int64(time.Since(clockStart)) }

type config struct {
	target      string
	rate        float64
	duration    float64
	users       int
	expires     int
	sockets     int
	local       string
	localPorts  string
	domain      string
	warmup      bool
	warmupRate  float64
	timeout     time.Duration
	cseqBase    uint64
	firstUser   int
	callidTag   string
	seed        uint64
	spin        time.Duration
	bufBytes    int
	recvTick    time.Duration
	rtPriority  int
	responder   string
	showVersion bool
}

// phase is one stream of REGISTERs: the warm-up ('w') or the measured Poisson phase ('m').
type phase struct {
	tag      byte
	name     string
	rate     float64 // offered (Poisson) or pacing (warm-up) rate, per second
	seconds  float64 // length of the schedule, s
	poisson  bool
	t0       int64   // monotonic ns of the schedule's origin
	sched    []int64 // ns after t0
	sent     []int64 // monotonic ns, 0 = not sent
	recv     []int64 // monotonic ns of the final answer, 0 = none (written by the receivers, atomically)
	status   []int32
	cseqOf   func(k int) uint64
	userOf   func(k int) int
	nSent    int
	sendErrs int
	answered atomic.Int64
	cpuNs    int64 // this process's CPU time over the phase
}

type gen struct {
	cfg          config
	fds          []int
	ports        []int
	branchPrefix []byte // "z9hG4bK-RUNID-"
	runID        string
	userStatic   [][]byte // per user: From, To, Call-ID and Contact lines
	phases       map[byte]*phase
	stop         atomic.Bool
	provisional  atomic.Int64
	duplicates   atomic.Int64
	unmatched    atomic.Int64
	mismatched   atomic.Int64
	recvErrs     atomic.Int64
	userStamps   atomic.Int64
	checked      [700]atomic.Bool
	sched        string // the sending thread's scheduling policy
	checksMu     sync.Mutex
	checks       map[string]string
}

func main() {
	var cfg config
	flag.StringVar(&cfg.target, "target", "127.0.0.1:5060", "registrar address, IPv4:port")
	flag.Float64Var(&cfg.rate, "rate", 2000, "mean rate of the measured phase, REGISTER/s (Poisson)")
	flag.Float64Var(&cfg.duration, "duration", 10, "length of the measured phase, s (0: warm-up only)")
	flag.IntVar(&cfg.users, "users", 10000, "distinct users (AoRs, each with one binding)")
	flag.IntVar(&cfg.expires, "expires", 300, "Contact expires parameter, s")
	flag.IntVar(&cfg.sockets, "sockets", 1, "UDP sockets (source ports); user i sends from socket i mod sockets")
	flag.StringVar(&cfg.local, "local", "127.0.0.1", "local IPv4 address to bind")
	flag.StringVar(&cfg.localPorts, "local-ports", "", "comma-separated source port of each socket (default: any); "+
		"keep them across runs: a registrar absorbs only refreshes from the source it registered")
	flag.StringVar(&cfg.domain, "domain", "example.com", "domain of the AoRs and of the Request-URI")
	flag.BoolVar(&cfg.warmup, "warmup", false, "first register every user once, evenly paced at -warmup-rate")
	flag.Float64Var(&cfg.warmupRate, "warmup-rate", 1000, "warm-up REGISTERs per second")
	flag.DurationVar(&cfg.timeout, "timeout", 2*time.Second, "a REGISTER unanswered this long is lost")
	flag.Uint64Var(&cfg.cseqBase, "cseq-base", 1, "CSeq of each user's first REGISTER in this run")
	flag.IntVar(&cfg.firstUser, "first-user", 0, "user of the measured phase's first REGISTER (round robin from there)")
	flag.StringVar(&cfg.callidTag, "callid-tag", "pg", "part of every Call-ID (same tag: same Call-IDs across runs)")
	flag.Uint64Var(&cfg.seed, "seed", 0, "seed of the schedule (0: random)")
	flag.DurationVar(&cfg.spin, "spin", 20*time.Microsecond, "busy-wait the last SPIN before each send instead of "+
		"sleeping (a sleep overshoots by ~25 µs on a VM: shorter gaps are only kept by spinning)")
	flag.IntVar(&cfg.bufBytes, "buffer", 4<<20, "SO_SNDBUF and SO_RCVBUF of each socket, bytes")
	flag.IntVar(&cfg.rtPriority, "rt-priority", 0, "run the sending thread SCHED_FIFO at this priority (1-99; 0: normal)")
	flag.DurationVar(&cfg.recvTick, "recv-tick", time.Millisecond, "how often the receivers drain their sockets (answers carry kernel stamps)")
	flag.StringVar(&cfg.responder, "responder", "", "run as a stand-in server on IPv4:port: 200 OK to every request")
	flag.BoolVar(&cfg.showVersion, "version", false, "print the Go and sipgo versions and exit")
	flag.Parse()
	if cfg.showVersion {
		fmt.Println(runtime.Version(), sipgoVersion())
		return
	}
	if cfg.responder != "" {
		if err := runResponder(cfg.responder, cfg.bufBytes); err != nil {
			fatal("responder: %v", err)
		}
		return
	}
	if cfg.users < 1 || cfg.sockets < 1 || cfg.firstUser < 0 || cfg.firstUser >= cfg.users || cfg.rate <= 0 || cfg.warmupRate <= 0 || cfg.duration < 0 {
		fatal("bad arguments: -users, -sockets, -rate and -warmup-rate must be positive, -duration >= 0, 0 <= -first-user < -users")
	}
	if cfg.duration == 0 && !cfg.warmup {
		fatal("nothing to do: -duration 0 without -warmup")
	}
	rep, err := run(cfg)
	if err != nil {
		fatal("%v", err)
	}
	out, _ := json.MarshalIndent(rep, "", "  ")
	fmt.Println(string(out))
}

func fatal(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "poissongen: "+format+"\n", args...)
	os.Exit(2)
}

func sipgoVersion() string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, d := range bi.Deps {
			if d.Path == "github.com/emiago/sipgo" {
				return d.Path + "@" + d.Version
			}
		}
	}
	return "github.com/emiago/sipgo"
}

// digits reads an unsigned decimal number that is the whole of b.
func digits(b []byte) (uint64, bool) {
	if len(b) == 0 || len(b) > 18 {
		return 0, false
	}
	var n uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + uint64(c-'0')
	}
	return n, true
}

// ---------------------------------------------------------------------------------------------- sockets

func parseV4(s string) (netip.AddrPort, error) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil || !ap.Addr().Is4() {
		return netip.AddrPort{}, fmt.Errorf("want IPv4:port, got %q", s)
	}
	return ap, nil
}

func udpSocket(local netip.Addr, port int, bufBytes int) (int, error) {
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	for _, o := range [][2]int{{syscall.SO_SNDBUFFORCE, syscall.SO_SNDBUF}, {syscall.SO_RCVBUFFORCE, syscall.SO_RCVBUF}} {
		if syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, o[0], bufBytes) != nil {
			_ = syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, o[1], bufBytes)
		}
	}
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Port: port, Addr: local.As4()}); err != nil {
		syscall.Close(fd)
		return -1, err
	}
	return fd, nil
}

// ---------------------------------------------------------------------------------------------- generator

func run(cfg config) (map[string]any, error) {
	target, err := parseV4(cfg.target)
	if err != nil {
		return nil, err
	}
	local, err := netip.ParseAddr(cfg.local)
	if err != nil || !local.Is4() {
		return nil, fmt.Errorf("-local: want an IPv4 address, got %q", cfg.local)
	}
	g := &gen{cfg: cfg, phases: map[byte]*phase{}, checks: map[string]string{}, sched: "other"}
	g.runID = strconv.FormatUint(rand.Uint64()&0xffffffffff, 36)
	g.branchPrefix = []byte("z9hG4bK-" + g.runID + "-")
	ports := make([]int, cfg.sockets)
	if cfg.localPorts != "" {
		list := strings.Split(cfg.localPorts, ",")
		if len(list) != cfg.sockets {
			return nil, fmt.Errorf("-local-ports names %d ports for %d sockets", len(list), cfg.sockets)
		}
		for i, v := range list {
			if ports[i], err = strconv.Atoi(strings.TrimSpace(v)); err != nil || ports[i] <= 0 || ports[i] > 65535 {
				return nil, fmt.Errorf("-local-ports: bad port %q", v)
			}
		}
	}
	for s := 0; s < cfg.sockets; s++ {
		fd, err := udpSocket(local, ports[s], cfg.bufBytes)
		if err != nil {
			return nil, fmt.Errorf("socket on %s:%d: %w", cfg.local, ports[s], err)
		}
		if err := syscall.Connect(fd, &syscall.SockaddrInet4{Port: int(target.Port()), Addr: target.Addr().As4()}); err != nil {
			return nil, fmt.Errorf("connect %s: %w", cfg.target, err)
		}
		if err := syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_TIMESTAMPNS, 1); err != nil {
			return nil, fmt.Errorf("SO_TIMESTAMPNS: %w", err)
		}
		sa, err := syscall.Getsockname(fd)
		if err != nil {
			return nil, err
		}
		g.fds = append(g.fds, fd)
		g.ports = append(g.ports, sa.(*syscall.SockaddrInet4).Port)
	}
	g.userStatic = make([][]byte, cfg.users)
	for i := range cfg.users {
		g.userStatic[i] = userLines(cfg, i)
	}

	seed := cfg.seed
	if seed == 0 {
		seed = rand.Uint64()
	}
	var warm, meas *phase
	if cfg.warmup {
		n := cfg.users
		warm = &phase{tag: 'w', name: "warmup", rate: cfg.warmupRate, seconds: float64(n) / cfg.warmupRate}
		warm.sched = make([]int64, n)
		for i := range n {
			warm.sched[i] = int64(float64(i) * 1e9 / cfg.warmupRate)
		}
		warm.userOf = func(k int) int { return k }
		warm.cseqOf = func(int) uint64 { return cfg.cseqBase }
		g.phases['w'] = warm
	}
	measBase := cfg.cseqBase
	if cfg.warmup {
		measBase++
	}
	if cfg.duration > 0 {
		meas = &phase{tag: 'm', name: "poisson", rate: cfg.rate, seconds: cfg.duration, poisson: true}
		rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
		limit := int64(cfg.duration * 1e9)
		expect := cfg.rate * cfg.duration
		meas.sched = make([]int64, 0, int(expect+8*math.Sqrt(expect)+64))
		t := 0.0
		for {
			t += rng.ExpFloat64() / cfg.rate * 1e9
			if int64(t) >= limit {
				break
			}
			meas.sched = append(meas.sched, int64(t))
		}
		// The k-th REGISTER is number first+k of an endless round robin over the users: user (first+k) mod N,
		// CSeq measBase + (first+k) div N. A later run that starts at first_user_next with cseq_next goes on
		// with the same numbering, so each user's CSeq only grows.
		n, first := cfg.users, cfg.firstUser
		meas.userOf = func(k int) int { return (first + k) % n }
		meas.cseqOf = func(k int) uint64 { return measBase + uint64((first+k)/n) }
		g.phases['m'] = meas
	}
	for _, p := range g.phases {
		p.sent = make([]int64, len(p.sched))
		p.recv = make([]int64, len(p.sched))
		p.status = make([]int32, len(p.sched))
	}
	g.checkRequest(warm, meas)

	// Every thread that sleeps, writes or reads in the kernel keeps its P (rawSleep): two spare Ps for the
	// rest of the runtime (signals, the drain loop, the garbage collector).
	runtime.GOMAXPROCS(max(runtime.GOMAXPROCS(0), len(g.fds)+3))
	var wg sync.WaitGroup
	for _, fd := range g.fds {
		wg.Add(1)
		go func() {
			defer wg.Done()
			g.receive(fd)
		}()
	}
	// Ctrl-C / SIGTERM: stop sending, report what was measured.
	interrupted := atomic.Bool{}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-sigs
		interrupted.Store(true)
	}()

	for _, p := range []*phase{warm, meas} {
		if p == nil {
			continue
		}
		ru0 := cpuNs()
		g.send(p, &interrupted)
		g.drain(p)
		p.cpuNs = cpuNs() - ru0
	}
	g.stop.Store(true)
	wg.Wait()
	for _, fd := range g.fds {
		syscall.Close(fd)
	}

	cseqNext, firstNext := measBase, 0
	if meas != nil {
		j := cfg.firstUser + meas.nSent
		cseqNext, firstNext = measBase+uint64(j/cfg.users), j%cfg.users
	}
	rep := map[string]any{
		"command":         strings.Join(os.Args, " "),
		"target":          cfg.target,
		"users":           cfg.users,
		"sockets":         cfg.sockets,
		"local_ports":     g.ports,
		"expires":         cfg.expires,
		"run_id":          g.runID,
		"seed":            seed,
		"cseq_first":      cfg.cseqBase,
		"cseq_next":       cseqNext,
		"first_user_next": firstNext,
		"timeout_ms":      cfg.timeout.Milliseconds(),
		"spin_us":         cfg.spin.Microseconds(),
		"sender_sched":    g.sched,
		"provisional":     g.provisional.Load(),
		"duplicates":      g.duplicates.Load(),
		"unmatched":       g.unmatched.Load(),
		"mismatched":      g.mismatched.Load(),
		"recv_errors":     g.recvErrs.Load(),
		"user_stamps":     g.userStamps.Load(),
		"clock_skew_us":   round(float64(time.Now().UnixNano()-wallAtStart-now())/1e3, 1),
		"sipgo_checks": func() map[string]string {
			g.checksMu.Lock()
			defer g.checksMu.Unlock()
			return g.checks
		}(),
		"interrupted": interrupted.Load(),
		"go":          runtime.Version(),
		"sipgo":       sipgoVersion(),
		"gomaxprocs":  runtime.GOMAXPROCS(0),
	}
	if warm != nil {
		rep["warmup"] = g.report(warm)
	}
	if meas != nil {
		rep["measured"] = g.report(meas)
	}
	return rep, nil
}

func contactOf(i int) (string, int) {
	return fmt.Sprintf("127.0.%d.1", (i/contactPorts)%256), contactPortBase + i%contactPorts
}

func callID(tag string, i int) string { return "pg-" + strconv.Itoa(i) + "-" + tag + "@poissongen" }

func userLines(cfg config, i int) []byte {
	host, port := contactOf(i)
	u := "user" + strconv.Itoa(i)
	return []byte(fmt.Sprintf(
		"From: <sip:%s@%s>;tag=pg%d\r\nTo: <sip:%s@%s>\r\nCall-ID: %s\r\nContact: <sip:%s@%s:%d>;expires=%d\r\n",
		u, cfg.domain, i, u, cfg.domain, callID(cfg.callidTag, i), u, host, port, cfg.expires))
}

// build appends request k of phase p to dst.
func (g *gen) build(dst []byte, p *phase, k int) ([]byte, int) {
	user := p.userOf(k)
	s := user % len(g.fds)
	dst = append(dst, "REGISTER sip:"...)
	dst = append(dst, g.cfg.domain...)
	dst = append(dst, " SIP/2.0\r\nVia: SIP/2.0/UDP "...)
	dst = append(dst, g.cfg.local...)
	dst = append(dst, ':')
	dst = strconv.AppendInt(dst, int64(g.ports[s]), 10)
	dst = append(dst, ";rport;branch="...)
	dst = append(dst, g.branchPrefix...)
	dst = append(dst, p.tag)
	dst = strconv.AppendInt(dst, int64(k), 10)
	dst = append(dst, "\r\nMax-Forwards: 70\r\n"...)
	dst = append(dst, g.userStatic[user]...)
	dst = append(dst, "CSeq: "...)
	dst = strconv.AppendUint(dst, p.cseqOf(k), 10)
	dst = append(dst, " REGISTER\r\nUser-Agent: poissongen\r\nContent-Length: 0\r\n\r\n"...)
	return dst, s
}

// rawSleep and rawWrite enter the kernel without telling the Go scheduler (a P stays with the thread while it
// sleeps or writes): a blocking syscall's hand-off of the P, and sysmon's polling that comes with it, cost
// tens of µs of CPU per REGISTER at these rates. GOMAXPROCS leaves spare Ps for the rest of the runtime.
func rawSleep(d int64) {
	ts := syscall.NsecToTimespec(d)
	_, _, _ = syscall.RawSyscall(syscall.SYS_NANOSLEEP, uintptr(unsafe.Pointer(&ts)), 0, 0)
}

func rawWrite(fd int, b []byte) syscall.Errno {
	_, _, e := syscall.RawSyscall(syscall.SYS_WRITE, uintptr(fd), uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
	return e
}

// setFIFO makes the calling thread SCHED_FIFO (root or CAP_SYS_NICE; the kernel's RT throttling still
// leaves the other threads 5 % of each CPU): the sends then leave at their instants even while the target
// keeps both cores busy, instead of waiting for a time slice, and the arrivals stay independent of the
// target's load. It says what the thread got.
func setFIFO(priority int) string {
	param := struct{ priority int32 }{int32(priority)}
	_, _, e := syscall.RawSyscall(syscall.SYS_SCHED_SETSCHEDULER, 0, 1 /* SCHED_FIFO */, uintptr(unsafe.Pointer(&param)))
	if e != 0 {
		return "other (SCHED_FIFO refused: " + e.Error() + ")"
	}
	return "fifo " + strconv.Itoa(priority)
}

func setOther() {
	param := struct{ priority int32 }{0}
	_, _, _ = syscall.RawSyscall(syscall.SYS_SCHED_SETSCHEDULER, 0, 0 /* SCHED_OTHER */, uintptr(unsafe.Pointer(&param)))
}

// send runs phase p's schedule on one locked OS thread.
func (g *gen) send(p *phase, interrupted *atomic.Bool) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	_, _, _ = syscall.RawSyscall(syscall.SYS_PRCTL, prSetTimerslack, 1, 0)
	if g.cfg.rtPriority > 0 {
		g.sched = setFIFO(g.cfg.rtPriority)
		defer setOther() // the thread goes back to the runtime's pool
	}
	spin := int64(g.cfg.spin)
	buf := make([]byte, 0, 1024)
	p.t0 = now() + int64(20*time.Millisecond)
	for k, at := range p.sched {
		if interrupted.Load() {
			break
		}
		var s int
		buf, s = g.build(buf[:0], p, k)
		due := p.t0 + at
		for {
			d := due - now()
			if d <= spin {
				break
			}
			rawSleep(d - spin)
		}
		for spin > 0 && now() < due {
		}
		t := now()
		p.sent[k] = t
		if rawWrite(g.fds[s], buf) != 0 {
			p.sendErrs++
			p.sent[k] = 0
			continue
		}
		p.nSent = k + 1
	}
}

// drain waits until every REGISTER sent in p is answered, or -timeout after the last one was sent.
func (g *gen) drain(p *phase) {
	sent := 0
	last := p.t0
	for _, t := range p.sent {
		if t != 0 {
			sent++
			last = max(last, t)
		}
	}
	deadline := last + int64(g.cfg.timeout)
	for now() < deadline && int(p.answered.Load()) < sent {
		time.Sleep(2 * time.Millisecond)
	}
}

// receive drains socket fd every -recv-tick until the run stops. Each answer's time is the kernel's
// receive stamp (SO_TIMESTAMPNS: when the datagram reached this socket, on CLOCK_REALTIME, turned into this
// program's monotonic time with the clocks' offset at the read), so the tick costs the figures nothing and the thread wakes 1/tick times a
// second whatever the rate. An answer without a stamp is stamped when read ("user_stamps").
func (g *gen) receive(fd int) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	buf := make([]byte, 65536)
	oob := make([]byte, 256)
	var iov syscall.Iovec
	iov.Base = &buf[0]
	iov.SetLen(len(buf))
	var msg syscall.Msghdr
	msg.Iov = &iov
	msg.Iovlen = 1
	tick := max(int64(g.cfg.recvTick), 1000)
	hdr := syscall.CmsgLen(0)
	for {
		msg.Control = &oob[0]
		msg.SetControllen(len(oob))
		msg.Flags = 0
		n, _, e := syscall.RawSyscall(syscall.SYS_RECVMSG, uintptr(fd), uintptr(unsafe.Pointer(&msg)), syscall.MSG_DONTWAIT)
		if e == syscall.EAGAIN {
			if g.stop.Load() {
				return
			}
			rawSleep(tick)
			continue
		}
		if e != 0 {
			if e != syscall.EINTR {
				g.recvErrs.Add(1) // e.g. ECONNREFUSED: nothing listens on the target
			}
			continue
		}
		t := int64(0)
		for off := 0; off+hdr <= int(msg.Controllen); {
			h := (*syscall.Cmsghdr)(unsafe.Pointer(&oob[off]))
			if h.Len == 0 {
				break
			}
			if h.Level == syscall.SOL_SOCKET && h.Type == syscall.SCM_TIMESTAMPNS && off+hdr+16 <= int(msg.Controllen) {
				ts := (*syscall.Timespec)(unsafe.Pointer(&oob[off+hdr]))
				// The stamp is on CLOCK_REALTIME, which the host may step or slew during a run (a VM's
				// clock being corrected): turn it into monotonic time with the two clocks' offset read
				// now, a few ms at most after the stamp, not the offset at the start.
				w := time.Now()
				t = ts.Nano() - (w.UnixNano() - int64(w.Sub(clockStart)))
				break
			}
			off += syscall.CmsgSpace(int(h.Len) - hdr)
		}
		if t == 0 {
			t = now()
			g.userStamps.Add(1)
		}
		g.handle(buf[:n], t)
	}
}

// fields of an answer that matter here, read without allocating.
type answer struct {
	code   int
	branch []byte
	callID []byte
	cseq   uint64
}

func parseAnswer(msg []byte) (answer, bool) {
	var a answer
	if len(msg) < 12 || !bytes.HasPrefix(msg, []byte("SIP/2.0 ")) {
		return a, false
	}
	c, ok := digits(msg[8:11])
	if !ok {
		return a, false
	}
	a.code = int(c)
	gotVia := false
	headerLines(msg, func(_, name, value []byte) {
		switch {
		case !gotVia && (bytes.EqualFold(name, []byte("via")) || bytes.EqualFold(name, []byte("v"))):
			gotVia = true
			if j := bytes.Index(value, []byte("branch=")); j >= 0 {
				b := value[j+7:]
				if e := bytes.IndexAny(b, ";, \t"); e >= 0 {
					b = b[:e]
				}
				a.branch = b
			}
		case bytes.EqualFold(name, []byte("call-id")) || bytes.EqualFold(name, []byte("i")):
			a.callID = value
		case bytes.EqualFold(name, []byte("cseq")):
			if e := bytes.IndexAny(value, " \t"); e > 0 {
				if n, ok := digits(value[:e]); ok {
					a.cseq = n
				}
			}
		}
	})
	return a, true
}

// headerLines calls fn with each header line of a message (after its first line, up to the blank line)
// and the line's trimmed name and value; a line without a colon is skipped.
func headerLines(msg []byte, fn func(line, name, value []byte)) {
	rest := msg
	if i := bytes.Index(rest, []byte("\r\n")); i >= 0 {
		rest = rest[i+2:]
	}
	for len(rest) > 0 {
		i := bytes.Index(rest, []byte("\r\n"))
		if i <= 0 {
			return // end of headers (or no CRLF)
		}
		line := rest[:i]
		rest = rest[i+2:]
		if colon := bytes.IndexByte(line, ':'); colon > 0 {
			fn(line, bytes.TrimSpace(line[:colon]), bytes.TrimSpace(line[colon+1:]))
		}
	}
}

func (g *gen) handle(msg []byte, t int64) {
	a, ok := parseAnswer(msg)
	if !ok || !bytes.HasPrefix(a.branch, g.branchPrefix) || len(a.branch) < len(g.branchPrefix)+2 {
		g.unmatched.Add(1)
		return
	}
	p := g.phases[a.branch[len(g.branchPrefix)]]
	k64, ok := digits(a.branch[len(g.branchPrefix)+1:])
	k := int(k64)
	if p == nil || !ok || k >= len(p.recv) {
		g.unmatched.Add(1)
		return
	}
	var cid [96]byte
	want := append(cid[:0], "pg-"...)
	want = strconv.AppendInt(want, int64(p.userOf(k)), 10)
	want = append(want, '-')
	want = append(want, g.cfg.callidTag...)
	want = append(want, "@poissongen"...)
	if !bytes.Equal(a.callID, want) || a.cseq != p.cseqOf(k) {
		g.mismatched.Add(1)
		return
	}
	if a.code >= 100 && a.code < 700 && !g.checked[a.code].Load() && g.checked[a.code].CompareAndSwap(false, true) {
		g.checkAnswer(msg, a)
	}
	if a.code < 200 {
		g.provisional.Add(1)
		return
	}
	if !atomic.CompareAndSwapInt64(&p.recv[k], 0, t) {
		g.duplicates.Add(1)
		return
	}
	atomic.StoreInt32(&p.status[k], int32(a.code))
	p.answered.Add(1)
}

// ---------------------------------------------------------------------------------------- sipgo checks

func (g *gen) note(key, verdict string) {
	g.checksMu.Lock()
	g.checks[key] = verdict
	g.checksMu.Unlock()
}

// checkRequest parses the first REGISTER of each phase with sipgo and compares it with what was meant.
func (g *gen) checkRequest(phases ...*phase) {
	for _, p := range phases {
		if p == nil || len(p.sched) == 0 {
			continue
		}
		raw, _ := g.build(nil, p, 0)
		key := "request_" + p.name
		m, err := sip.ParseMessage(raw)
		if err != nil {
			g.note(key, "sipgo cannot parse: "+err.Error())
			continue
		}
		req, ok := m.(*sip.Request)
		user := p.userOf(0)
		host, port := contactOf(user)
		var problems []string
		switch {
		case !ok:
			problems = append(problems, "not a request")
		default:
			if req.Method != sip.REGISTER {
				problems = append(problems, "method "+string(req.Method))
			}
			if req.CallID() == nil || req.CallID().Value() != callID(g.cfg.callidTag, user) {
				problems = append(problems, "Call-ID")
			}
			if req.CSeq() == nil || uint64(req.CSeq().SeqNo) != p.cseqOf(0) || req.CSeq().MethodName != sip.REGISTER {
				problems = append(problems, "CSeq")
			}
			if v := req.Via(); v == nil || v.Params.GetOr("branch", "") != string(g.branchPrefix)+string(p.tag)+"0" {
				problems = append(problems, "Via branch")
			}
			c := req.Contact()
			if c == nil || c.Address.Host != host || c.Address.Port != port || c.Params.GetOr("expires", "") != strconv.Itoa(g.cfg.expires) {
				problems = append(problems, "Contact")
			}
			if req.From() == nil || req.From().Address.User != "user"+strconv.Itoa(user) || req.To() == nil {
				problems = append(problems, "From/To")
			}
		}
		if problems == nil {
			g.note(key, "ok")
		} else {
			g.note(key, "differs: "+strings.Join(problems, ", "))
		}
	}
}

// checkAnswer parses one answer with sipgo and compares it with this program's own reading.
func (g *gen) checkAnswer(msg []byte, a answer) {
	key := "answer_" + strconv.Itoa(a.code)
	m, err := sip.ParseMessage(append([]byte(nil), msg...))
	if err != nil {
		g.note(key, "sipgo cannot parse: "+err.Error())
		return
	}
	res, ok := m.(*sip.Response)
	var problems []string
	switch {
	case !ok:
		problems = append(problems, "not a response")
	default:
		if res.StatusCode != a.code {
			problems = append(problems, "status")
		}
		if res.CallID() == nil || res.CallID().Value() != string(a.callID) {
			problems = append(problems, "Call-ID")
		}
		if res.CSeq() == nil || uint64(res.CSeq().SeqNo) != a.cseq {
			problems = append(problems, "CSeq")
		}
		if v := res.Via(); v == nil || v.Params.GetOr("branch", "") != string(a.branch) {
			problems = append(problems, "Via branch")
		}
	}
	if problems == nil {
		g.note(key, "ok")
	} else {
		g.note(key, "differs: "+strings.Join(problems, ", "))
	}
}

// ---------------------------------------------------------------------------------------------- figures

func cpuNs() int64 {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return ru.Utime.Nano() + ru.Stime.Nano()
}

// nearestRank is the ceil(permille/1000 * n)-th smallest of sorted (integer arithmetic: p99.9 is 999).
func nearestRank(sorted []int64, permille int) int64 {
	n := len(sorted)
	rank := (permille*n + 999) / 1000
	rank = min(n, max(1, rank))
	return sorted[rank-1]
}

func us(ns int64) float64 { return math.Round(float64(ns)/10) / 100 }

func summary(values []int64, permilles map[string]int) map[string]any {
	out := map[string]any{"n": len(values)}
	if len(values) == 0 {
		return out
	}
	s := slices.Clone(values)
	slices.Sort(s)
	var sum float64
	for _, v := range s {
		sum += float64(v)
	}
	out["mean"] = us(int64(sum / float64(len(s))))
	for name, pm := range permilles {
		out[name] = us(nearestRank(s, pm))
	}
	return out
}

// ksExp is the Kolmogorov-Smirnov distance between the gaps (ns) and an exponential of rate (per s).
func ksExp(gaps []int64, rate float64) float64 {
	if len(gaps) == 0 {
		return math.NaN()
	}
	s := slices.Clone(gaps)
	slices.Sort(s)
	n := float64(len(s))
	d := 0.0
	for i, x := range s {
		f := 1 - math.Exp(-rate*float64(x)/1e9)
		d = max(d, f-float64(i)/n, float64(i+1)/n-f)
	}
	return d
}

func cv(gaps []int64) float64 {
	if len(gaps) < 2 {
		return math.NaN()
	}
	var sum, sq float64
	for _, x := range gaps {
		sum += float64(x)
	}
	mean := sum / float64(len(gaps))
	for _, x := range gaps {
		sq += (float64(x) - mean) * (float64(x) - mean)
	}
	return math.Sqrt(sq/float64(len(gaps)-1)) / mean
}

// dispersion is variance / mean of the number of instants per window of w ns over [from, to).
func dispersion(times []int64, from, to, w int64) float64 {
	nw := int((to - from) / w)
	if nw < 2 {
		return math.NaN()
	}
	counts := make([]float64, nw)
	for _, t := range times {
		i := int((t - from) / w)
		if i >= 0 && i < nw {
			counts[i]++
		}
	}
	var sum, sq float64
	for _, c := range counts {
		sum += c
	}
	mean := sum / float64(nw)
	for _, c := range counts {
		sq += (c - mean) * (c - mean)
	}
	if mean == 0 {
		return math.NaN()
	}
	return sq / float64(nw-1) / mean
}

func round(x float64, digits int) any {
	if math.IsNaN(x) || math.IsInf(x, 0) {
		return nil
	}
	f := math.Pow(10, float64(digits))
	return math.Round(x*f) / f
}

func (g *gen) report(p *phase) map[string]any {
	timeout := int64(g.cfg.timeout)
	var lat, late, sentAt, schedAt []int64
	statuses := map[string]int{}
	lost, tooLate := 0, 0
	firstSent, lastSent, lastRecv := int64(0), int64(0), int64(0)
	for k := range p.sched {
		s := p.sent[k]
		if s == 0 {
			continue
		}
		if firstSent == 0 {
			firstSent = s
		}
		lastSent = s
		sentAt = append(sentAt, s)
		schedAt = append(schedAt, p.t0+p.sched[k])
		late = append(late, s-(p.t0+p.sched[k]))
		r := atomic.LoadInt64(&p.recv[k])
		switch {
		case r == 0:
			lost++
		case r-s > timeout:
			lost++
			tooLate++
		default:
			lat = append(lat, r-s)
			statuses[strconv.Itoa(int(atomic.LoadInt32(&p.status[k])))]++
			lastRecv = max(lastRecv, r)
		}
	}
	sent := len(sentAt)
	pcts := map[string]int{"p50": 500, "p90": 900, "p99": 990, "p999": 999, "max": 1000}
	out := map[string]any{
		"offered_rate":    p.rate,
		"duration_s":      p.seconds,
		"scheduled":       len(p.sched),
		"sent":            sent,
		"send_errors":     p.sendErrs,
		"responses":       statuses,
		"answered":        len(lat),
		"lost":            lost,
		"late":            tooLate,
		"latency_us":      summary(lat, pcts),
		"generator_cpu_s": round(float64(p.cpuNs)/1e9, 3),
		"generator_cpu_us_per_send": func() any {
			if sent == 0 {
				return nil
			}
			return round(float64(p.cpuNs)/1e3/float64(sent), 2)
		}(),
	}
	if sent > 0 {
		span := float64(max(lastSent-p.t0, int64(p.seconds*1e9))) / 1e9
		out["achieved_send_rate"] = round(float64(sent)/span, 1)
		out["schedule_rate"] = round(float64(len(p.sched))/p.seconds, 1)
		if lastRecv > 0 {
			out["answer_rate"] = round(float64(len(lat))/(float64(max(lastRecv, lastSent)-p.t0)/1e9), 1)
		}
	}
	pacing := map[string]any{"lateness_us": summary(late, map[string]int{"p50": 500, "p99": 990, "p999": 999, "max": 1000})}
	if p.poisson && sent > 2 {
		gaps := make([]int64, 0, sent-1)
		for i := 1; i < len(sentAt); i++ {
			gaps = append(gaps, sentAt[i]-sentAt[i-1])
		}
		sgaps := make([]int64, 0, sent-1)
		for i := 1; i < len(schedAt); i++ {
			sgaps = append(sgaps, schedAt[i]-schedAt[i-1])
		}
		pacing["gap_cv"] = round(cv(gaps), 4)
		pacing["gap_cv_schedule"] = round(cv(sgaps), 4)
		pacing["ks_d"] = round(ksExp(gaps, p.rate), 5)
		pacing["ks_d_schedule"] = round(ksExp(sgaps, p.rate), 5)
		pacing["ks_crit_05"] = round(1.36/math.Sqrt(float64(len(gaps))), 5)
		ms := int64(time.Millisecond)
		pacing["dispersion_1ms"] = round(dispersion(sentAt, p.t0, p.t0+int64(p.seconds*1e9), ms), 3)
		pacing["dispersion_10ms"] = round(dispersion(sentAt, p.t0, p.t0+int64(p.seconds*1e9), 10*ms), 3)
		pacing["dispersion_1ms_schedule"] = round(dispersion(schedAt, p.t0, p.t0+int64(p.seconds*1e9), ms), 3)
		// Bursts: sends closer than 10 µs, against what an exponential of this rate gives.
		close10 := 0
		for _, x := range gaps {
			if x < 10*int64(time.Microsecond) {
				close10++
			}
		}
		pacing["gaps_under_10us"] = round(float64(close10)/float64(len(gaps)), 5)
		pacing["gaps_under_10us_expected"] = round(1-math.Exp(-p.rate*10e-6), 5)
	}
	out["pacing"] = pacing
	return out
}

// ---------------------------------------------------------------------------------------------- responder

// runResponder answers every request received on addr with a 200 OK carrying its Via, From, To (with a
// tag), Call-ID and CSeq: nothing else, one thread, so that the generator's own limits can be measured.
func runResponder(addr string, bufBytes int) error {
	ap, err := parseV4(addr)
	if err != nil {
		return err
	}
	fd, err := udpSocket(ap.Addr(), int(ap.Port()), bufBytes)
	if err != nil {
		return err
	}
	var answered atomic.Int64
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-sigs
		fmt.Printf("{\"answered\": %d}\n", answered.Load())
		os.Exit(0)
	}()
	fmt.Fprintf(os.Stderr, "poissongen responder ready on %s\n", addr)
	// Blocking raw syscalls on a locked thread (see rawSleep); spare Ps for the signal handler.
	runtime.GOMAXPROCS(max(runtime.GOMAXPROCS(0), 3))
	runtime.LockOSThread()
	buf := make([]byte, 65536)
	out := make([]byte, 0, 2048)
	var from syscall.RawSockaddrInet4
	for {
		fromLen := uint32(unsafe.Sizeof(from))
		n, _, e := syscall.RawSyscall6(syscall.SYS_RECVFROM, uintptr(fd), uintptr(unsafe.Pointer(&buf[0])),
			uintptr(len(buf)), 0, uintptr(unsafe.Pointer(&from)), uintptr(unsafe.Pointer(&fromLen)))
		if e != 0 || n < 12 || bytes.HasPrefix(buf[:n], []byte("SIP/")) {
			continue
		}
		out = answer200(out[:0], buf[:n])
		_, _, e = syscall.RawSyscall6(syscall.SYS_SENDTO, uintptr(fd), uintptr(unsafe.Pointer(&out[0])),
			uintptr(len(out)), 0, uintptr(unsafe.Pointer(&from)), uintptr(fromLen))
		if e == 0 {
			answered.Add(1)
		}
	}
}

// echoed are the header names a 200 OK copies from its request; To and its compact form come last.
var echoed = [][]byte{[]byte("via"), []byte("v"), []byte("from"), []byte("f"), []byte("call-id"), []byte("i"),
	[]byte("cseq"), []byte("to"), []byte("t")}

func answer200(out, req []byte) []byte {
	out = append(out, "SIP/2.0 200 OK\r\n"...)
	headerLines(req, func(line, name, _ []byte) {
		for j, h := range echoed {
			if bytes.EqualFold(name, h) {
				out = append(out, line...)
				if j >= len(echoed)-2 && !bytes.Contains(line, []byte("tag=")) { // To
					out = append(out, ";tag=pgr"...)
				}
				out = append(out, "\r\n"...)
				break
			}
		}
	})
	return append(out, "Content-Length: 0\r\n\r\n"...)
}
