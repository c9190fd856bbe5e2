// Package agent is svcnat's sync loop: it collects which Services changed,
// rebuilds only those with model.BuildService, and hands the assembled
// model.State to the backend, at a bounded rate, with retries and a periodic
// full reconcile. It also serves the agent's health and the
// healthCheckNodePorts of Services with externalTrafficPolicy Local.
package agent

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/clock"

	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/model"
)

// Sources is where the agent reads Services, EndpointSlices and its Node
// from: the informer caches (watch.Watcher).
type Sources interface {
	// WaitForCacheSync blocks until the caches are filled and reports false
	// if ctx ended first.
	WaitForCacheSync(ctx context.Context) bool
	// Service returns the Service, or nil when it does not exist or is
	// ignored.
	Service(key types.NamespacedName) (*corev1.Service, error)
	// EndpointSlices returns the Service's EndpointSlices.
	EndpointSlices(key types.NamespacedName) ([]*discoveryv1.EndpointSlice, error)
	// ServiceKeys returns the names of every Service.
	ServiceKeys() ([]types.NamespacedName, error)
	// Node returns this node's Node object, or nil when there is none.
	Node() *corev1.Node
}

// ConntrackCleaner removes conntrack entries that the new state made stale.
type ConntrackCleaner interface {
	// Clean is called after every successful Sync with the state
	// programmed; s.Change, when set, names what changed since the last
	// call, so that the cost can follow the change.
	Clean(s *model.State) error
}

// DriftChecker is a backend whose comparison of the kernel with what it
// last wrote costs too much for the sync loop (the iptables backend reads
// every rule): the agent runs it every SyncPeriod beside the loop (less
// often when it takes long, see driftCheckShare), and syncs as soon as the
// rate limit allows when it finds a difference.
type DriftChecker interface {
	// CheckDrift reports whether the kernel differs from what the backend
	// last wrote; the next Sync repairs it. It may run beside Sync.
	CheckDrift(ctx context.Context) (bool, error)
}

// Options configure an Agent. Zero durations take the defaults.
type Options struct {
	NodeName          string
	NodePortAddresses []netip.Prefix
	// NodePortPrimary adds the primary addresses of the node's Node object
	// to NodePortAddresses (--nodeport-addresses=primary).
	NodePortPrimary bool
	ClusterCIDRs    []netip.Prefix
	// NodeAddresses returns this node's current addresses, for NodePort
	// frontends; nil means none.
	NodeAddresses func() []netip.Addr
	// MinSyncInterval is the least time between two syncs (default 1s),
	// beyond a burst of syncBurst after a quiet spell: a burst of changes
	// within it is programmed in one sync.
	MinSyncInterval time.Duration
	// SyncPeriod is the interval of full reconciles (default 30s); the
	// health server reports unhealthy when a queued change waits for more
	// than twice as long.
	SyncPeriod time.Duration
	// RetryBackoff is the first delay after a failed sync (default 1s),
	// doubled after every further failure up to SyncPeriod.
	RetryBackoff time.Duration
	// BackendName is reported in the backend info metric.
	BackendName string
	// IPFamilies are the families the backend programs, for the ip_family
	// label of kube-proxy's metrics; nil means IPv4 and IPv6.
	IPFamilies []model.Family
	// Conntrack, when set, is called after each successful sync.
	Conntrack ConntrackCleaner
	// HealthCheckHost is the address the healthCheckNodePort servers listen
	// on; empty means every address.
	HealthCheckHost string
	Clock           clock.Clock
	Metrics         *Metrics
	Logger          *slog.Logger
}

// Agent runs the sync loop. Its MarkDirty and MarkAllDirty methods (the
// watch.Sink) may be called from any goroutine.
type Agent struct {
	opts         Options
	backend      dataplane.Backend
	src          Sources
	clock        clock.Clock
	log          *slog.Logger
	metrics      *Metrics
	health       *Health
	svcHealth    *ServiceHealth
	started      time.Time
	clusterCIDRs []netip.Prefix

	mu       sync.Mutex
	dirty    map[types.NamespacedName]struct{}
	allDirty bool
	due      time.Time // when the next sync runs; zero until caches synced
	earliest time.Time // when a change may be synced at the earliest (rate limit, back-off)
	paced    time.Time // when the syncs so far would end at one per MinSyncInterval
	armedFor time.Time // the due time the loop's timer is set for (for tests)
	wake     chan struct{}

	// Owned by the loop goroutine.
	ports map[types.NamespacedName][]*model.ServicePort // as built
	// conflicts resolves the frontend conflicts among ports; state holds
	// the resolved ServicePorts, handed to the backend, and changed the
	// names that differ from what the last successful sync programmed (all
	// of them when full is set: at start and after a failed sync).
	conflicts *model.Conflicts
	state     *model.State
	changed   map[model.ServicePortName]bool
	full      bool
	revision  uint64
	endpoints int                                          // cluster endpoints in state
	noLocal   noLocal                                      // of state, for kube-proxy's gauge
	checked   map[model.ServicePortName]*model.ServicePort // those of state with a health check node port
	triggers  map[types.NamespacedName]map[string]time.Time
	// ignored holds, per Service, what its last rebuild left alone on
	// purpose, so that each is logged and counted once.
	ignored  map[types.NamespacedName]map[string]bool
	pending  []trigger // slice changes not yet programmed
	failures int
	problems map[string]bool // conflicts and failed ServicePorts last reported
}

// New returns an Agent that programs backend from src. The backend must be
// initialised (Init) already.
func New(backend dataplane.Backend, src Sources, opts Options) *Agent {
	if opts.MinSyncInterval <= 0 {
		opts.MinSyncInterval = time.Second
	}
	if opts.SyncPeriod <= 0 {
		opts.SyncPeriod = 30 * time.Second
	}
	if opts.RetryBackoff <= 0 {
		opts.RetryBackoff = time.Second
	}
	if opts.Clock == nil {
		opts.Clock = clock.RealClock{}
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Metrics == nil {
		opts.Metrics = NewMetrics(nil)
	}
	if opts.IPFamilies == nil {
		opts.IPFamilies = []model.Family{model.IPv4, model.IPv6}
	}
	a := &Agent{
		opts:      opts,
		backend:   backend,
		src:       src,
		clock:     opts.Clock,
		log:       opts.Logger,
		metrics:   opts.Metrics,
		started:   opts.Clock.Now(),
		dirty:     map[types.NamespacedName]struct{}{},
		allDirty:  true,
		wake:      make(chan struct{}, 1),
		ports:     map[types.NamespacedName][]*model.ServicePort{},
		conflicts: model.NewConflicts(),
		state:     &model.State{ServicePorts: map[model.ServicePortName]*model.ServicePort{}},
		changed:   map[model.ServicePortName]bool{},
		full:      true,
		noLocal:   noLocal{},
		checked:   map[model.ServicePortName]*model.ServicePort{},
		triggers:  map[types.NamespacedName]map[string]time.Time{},
		ignored:   map[types.NamespacedName]map[string]bool{},
	}
	// Build canonicalises the cluster CIDRs the way the State holds them.
	if s, _ := model.Build(&model.Config{ClusterCIDRs: opts.ClusterCIDRs}, nil, nil); s != nil {
		a.clusterCIDRs = s.ClusterCIDRs
	}
	a.state.ClusterCIDRs = a.clusterCIDRs
	a.health = newHealth(opts.Clock, 2*opts.SyncPeriod, src.Node)
	a.health.queued()
	a.svcHealth = newServiceHealth(opts.HealthCheckHost, a.health, opts.Logger)
	a.metrics.backendInfo.WithLabelValues(opts.BackendName).Set(1)
	return a
}

// Health returns the agent's health, for the /healthz and /livez server.
func (a *Agent) Health() *Health { return a.health }

// ServiceChanged marks one Service for rebuilding in the next sync.
func (a *Agent) ServiceChanged(key types.NamespacedName) {
	a.mu.Lock()
	a.dirty[key] = struct{}{}
	a.scheduleLocked()
	a.mu.Unlock()
	a.health.queued()
	a.poke()
}

// AllChanged marks every Service for rebuilding in the next sync.
func (a *Agent) AllChanged() {
	a.mu.Lock()
	a.allDirty = true
	a.scheduleLocked()
	a.mu.Unlock()
	a.health.queued()
	a.poke()
}

// syncBurst is how many syncs may run back to back after a quiet spell
// before MinSyncInterval paces them, as kube-proxy's burstSyncs: the second
// of two changes that follow each other (a Service, then its EndpointSlice;
// a rolling update's new pod, then its old one) is programmed at once, not
// a window later. A longer burst still costs one sync per interval.
const syncBurst = 2

// scheduleLocked moves the next sync as early as the rate limit (or the
// retry back-off) allows. Before the first sync it does nothing: Run starts
// syncing once the caches are filled.
func (a *Agent) scheduleLocked() {
	if a.due.IsZero() {
		return
	}
	earliest := a.earliest
	if now := a.clock.Now(); earliest.Before(now) {
		earliest = now
	}
	if earliest.Before(a.due) {
		a.due = earliest
	}
}

func (a *Agent) poke() {
	select {
	case a.wake <- struct{}{}:
	default:
	}
}

// Run waits for the caches, then syncs until ctx ends. It never syncs
// before the caches are filled, so a restart does not program an empty
// state. It returns nil when ctx ends, leaving what is programmed in place.
func (a *Agent) Run(ctx context.Context) error {
	a.log.Info("waiting for informer caches")
	if !a.waitForCaches(ctx) {
		if ctx.Err() != nil {
			return nil
		}
		return errors.New("wait for informer caches: not synced")
	}
	defer a.svcHealth.Close()
	if dc, ok := a.backend.(DriftChecker); ok {
		timer := a.clock.NewTimer(a.opts.SyncPeriod)
		done := make(chan struct{})
		go func() {
			defer close(done)
			a.checkDrift(ctx, dc, timer)
		}()
		defer func() { <-done }()
	}
	a.mu.Lock()
	a.due = a.clock.Now()
	a.mu.Unlock()
	for {
		a.mu.Lock()
		due := a.due
		a.mu.Unlock()
		if wait := due.Sub(a.clock.Now()); wait > 0 {
			a.mu.Lock()
			timer := a.clock.NewTimer(wait)
			a.armedFor = due
			a.mu.Unlock()
			select {
			case <-ctx.Done():
				timer.Stop()
				return nil
			case <-a.wake:
			case <-timer.C():
			}
			timer.Stop()
			continue
		}
		if ctx.Err() != nil {
			return nil
		}
		a.syncAndSchedule(ctx)
	}
}

// driftCheckShare bounds the drift check's cost: the next check starts
// at least this many times the last one's duration after it ended. The
// iptables backend's comparison reads every rule (1.5–3 s of
// iptables-save and parsing at 10,000 Services, 18 s at 30,000: a tenth
// and more than half of a CPU if run every 30 s); it then runs every
// 75–150 s at 10,000 and 15 min at 30,000, still far sooner than
// kube-proxy's hourly full sync repairs a rule deleted by hand.
const driftCheckShare = 50

// checkDrift runs dc's comparison whenever timer fires, then every
// SyncPeriod (or driftCheckShare times its duration, if longer), until ctx
// ends; a difference found brings the next sync forward, which repairs it.
func (a *Agent) checkDrift(ctx context.Context, dc DriftChecker, timer clock.Timer) {
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C():
		}
		start := a.clock.Now()
		drift, err := dc.CheckDrift(ctx)
		took := a.clock.Since(start)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			a.log.Error("compare the dataplane with what was programmed", "err", err)
		}
		if drift {
			a.mu.Lock()
			a.scheduleLocked()
			a.mu.Unlock()
			a.health.queued()
			a.poke()
		}
		timer.Reset(max(a.opts.SyncPeriod, driftCheckShare*took))
	}
}

// cachesWaitLog is how often the agent says it still waits for the caches
// (client-go reports why, a failing list, only at debug level).
const cachesWaitLog = 15 * time.Second

// waitForCaches waits for the informer caches, logging while it waits.
func (a *Agent) waitForCaches(ctx context.Context) bool {
	done := make(chan struct{})
	defer close(done)
	go func() {
		for {
			select {
			case <-done:
				return
			case <-a.clock.After(cachesWaitLog):
				a.log.Warn("still waiting for informer caches; is the apiserver reachable? (-v debug shows why)",
					"waited", a.clock.Since(a.started).Round(time.Second))
			}
		}
	}()
	return a.src.WaitForCacheSync(ctx)
}

// syncAndSchedule runs one sync and sets when the next one is due.
func (a *Agent) syncAndSchedule(ctx context.Context) {
	a.health.queued() // a periodic sync is due work too
	start := a.clock.Now()
	err := a.sync(ctx)
	now := a.clock.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	if err != nil {
		a.failures++
		backoff := a.backoff()
		a.log.Error("sync failed, will retry", "err", err, "retryIn", backoff, "failures", a.failures)
		a.earliest = start.Add(backoff)
		a.due = a.earliest
	} else {
		a.failures = 0
		// A token bucket of syncBurst syncs refilled one per interval
		// (kept as the time the syncs would end if paced).
		interval := a.opts.MinSyncInterval
		a.paced = later(a.paced, start).Add(interval)
		a.earliest = a.paced.Add(-(syncBurst - 1) * interval)
		a.due = now.Add(a.opts.SyncPeriod)
	}
	if a.due.Before(now) {
		a.due = now
	}
	if len(a.dirty) > 0 || a.allDirty {
		a.scheduleLocked()
		a.health.queued()
	}
}

func later(x, y time.Time) time.Time {
	if x.After(y) {
		return x
	}
	return y
}

func (a *Agent) backoff() time.Duration {
	d := a.opts.RetryBackoff
	for i := 1; i < a.failures && d < a.opts.SyncPeriod; i++ {
		d *= 2
	}
	return min(d, max(a.opts.SyncPeriod, a.opts.RetryBackoff))
}

// takeDirty returns the Services to rebuild and forgets them.
func (a *Agent) takeDirty() ([]types.NamespacedName, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	keys := slices.Collect(maps.Keys(a.dirty))
	all := a.allDirty
	a.dirty = map[types.NamespacedName]struct{}{}
	a.allDirty = false
	return keys, all
}

// requeue marks keys dirty again after they could not be read.
func (a *Agent) requeue(keys []types.NamespacedName, all bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, k := range keys {
		a.dirty[k] = struct{}{}
	}
	a.allDirty = a.allDirty || all
}

// sync rebuilds the dirty Services and programs the whole state.
func (a *Agent) sync(ctx context.Context) error {
	start := a.clock.Now()
	queued := a.health.waited(start)
	keys, all := a.takeDirty()
	if all {
		current, err := a.src.ServiceKeys()
		if err != nil {
			a.requeue(keys, true)
			return fmt.Errorf("list services: %w", err)
		}
		keys = append(keys, current...)
		keys = append(keys, slices.Collect(maps.Keys(a.ports))...)
		slices.SortFunc(keys, func(x, y types.NamespacedName) int {
			return cmp.Or(strings.Compare(x.Namespace, y.Namespace), strings.Compare(x.Name, y.Name))
		})
		keys = slices.Compact(keys)
	}
	cfg := a.modelConfig()
	for _, key := range keys {
		if err := a.rebuild(cfg, key); err != nil {
			a.requeue([]types.NamespacedName{key}, false)
			a.log.Error("rebuild service", "service", key, "err", err)
		}
	}

	state := a.state
	state.Change = nil
	a.revision++
	if !a.full {
		state.Change = &model.Change{Revision: a.revision}
		for name := range a.changed {
			if _, ok := state.ServicePorts[name]; ok {
				state.Change.Updated = append(state.Change.Updated, name)
			} else {
				state.Change.Removed = append(state.Change.Removed, name)
			}
		}
		slices.SortFunc(state.Change.Updated, model.ServicePortName.Compare)
		slices.SortFunc(state.Change.Removed, model.ServicePortName.Compare)
	}
	var failed dataplane.PortErrors
	full := state.Change == nil // every ServicePort programmed, as kube-proxy's full sync
	if err := a.backend.Sync(ctx, state); err != nil && !errors.As(err, &failed) {
		a.metrics.syncErrors.Inc()
		a.metrics.kubeProxy.observeSync(a.opts.IPFamilies, a.clock.Now().Sub(start), full)
		a.full = true
		return fmt.Errorf("program %d service ports: %w", len(state.ServicePorts), err)
	}
	changed := len(a.changed)
	a.full = false
	a.changed = map[model.ServicePortName]bool{} // not clear: iterating a cleared map costs its peak size
	a.reportProblems(a.conflicts.Errors(), failed)
	now := a.clock.Now()
	for _, t := range a.pending {
		a.metrics.programmingLatency.Observe(now.Sub(t.at).Seconds())
	}
	a.metrics.kubeProxy.observeSync(a.opts.IPFamilies, now.Sub(start), full)
	a.metrics.kubeProxy.synced(a.opts.IPFamilies, now, a.noLocal, a.pending)
	a.pending = a.pending[:0]
	a.health.updated()
	a.svcHealth.Sync(&model.State{ServicePorts: a.checked})
	if a.opts.Conntrack != nil {
		if err := a.opts.Conntrack.Clean(state); err != nil {
			a.log.Error("clean stale udp conntrack entries", "err", err)
		}
	}
	took := now.Sub(start)
	a.metrics.syncDuration.Observe(took.Seconds())
	a.metrics.lastSync.Set(float64(now.UnixNano()) / 1e9)
	a.metrics.services.Set(float64(len(a.ports)))
	a.metrics.servicePorts.Set(float64(len(state.ServicePorts)))
	a.metrics.endpoints.Set(float64(a.endpoints))
	a.log.Info("synced", "services", len(a.ports), "servicePorts", len(state.ServicePorts),
		"endpoints", a.endpoints, "rebuilt", len(keys), "changed", changed, "revision", a.revision, "queued", queued, "took", took)
	return nil
}

// reportProblems logs each frontend conflict and each ServicePort the
// backend could not program once, when it appears (not on every sync while
// it lasts), and sets their gauges.
func (a *Agent) reportProblems(conflicts []error, failed dataplane.PortErrors) {
	a.metrics.frontendConflicts.Set(float64(len(conflicts)))
	a.metrics.servicePortsFailed.Set(float64(len(failed)))
	now := make(map[string]bool, len(conflicts)+len(failed))
	for _, err := range conflicts {
		msg := err.Error()
		now[msg] = true
		if !a.problems[msg] {
			a.log.Warn("frontend conflict", "err", msg)
		}
	}
	for name, err := range failed {
		msg := name.String() + ": " + err.Error()
		now[msg] = true
		if !a.problems[msg] {
			a.log.Error("service port not programmed; the others are", "servicePort", name.String(), "err", err)
		}
	}
	a.problems = now
}

// modelConfig is the node's view the model builds from, read fresh for
// every sync.
func (a *Agent) modelConfig() *model.Config {
	cfg := &model.Config{
		NodeName:          a.opts.NodeName,
		NodePortAddresses: a.opts.NodePortAddresses,
		NodePortPrimary:   a.opts.NodePortPrimary,
		ClusterCIDRs:      a.opts.ClusterCIDRs,
	}
	if a.opts.NodeAddresses != nil {
		cfg.NodeAddresses = a.opts.NodeAddresses()
	}
	if n := a.src.Node(); n != nil {
		cfg.NodeZone = n.Labels[corev1.LabelTopologyZone]
		cfg.PrimaryAddresses = model.PrimaryAddresses(n)
	}
	return cfg
}

// rebuild replaces the ServicePorts of one Service. Invalid parts of the
// Service are logged and counted; the rest is built.
func (a *Agent) rebuild(cfg *model.Config, key types.NamespacedName) error {
	svc, err := a.src.Service(key)
	if err != nil {
		return err
	}
	if svc == nil {
		a.setPorts(key, nil)
		delete(a.triggers, key)
		delete(a.ignored, key)
		return nil
	}
	slices, err := a.src.EndpointSlices(key)
	if err != nil {
		return err
	}
	sps, errs := model.BuildService(cfg, svc, slices)
	ignored := map[string]bool{}
	for _, err := range errs {
		if ig, ok := errors.AsType[*model.IgnoredError](err); ok {
			ignored[err.Error()] = true
			if !a.ignored[key][err.Error()] {
				a.Ignored(ig)
			}
			continue
		}
		kind := invalidKind(err)
		a.metrics.invalidObjects.WithLabelValues(kind).Inc()
		a.log.Warn("invalid object skipped", "service", key, "kind", kind, "err", err)
	}
	if len(ignored) == 0 {
		delete(a.ignored, key)
	} else {
		a.ignored[key] = ignored
	}
	a.setPorts(key, sps)
	a.noteTriggers(key, slices)
	return nil
}

// setPorts replaces the ServicePorts of one Service and notes which
// resolved ServicePorts changed. An unchanged ServicePort keeps its old
// value, so that nothing downstream sees it change.
func (a *Agent) setPorts(key types.NamespacedName, sps []*model.ServicePort) {
	gone := map[model.ServicePortName]*model.ServicePort{}
	for _, sp := range a.ports[key] {
		gone[sp.Name] = sp
	}
	for i, sp := range sps {
		if old := gone[sp.Name]; old != nil {
			delete(gone, sp.Name)
			if old.Identical(sp) {
				sps[i] = old
				continue
			}
		}
		a.setPort(sp.Name, sp)
	}
	for name := range gone {
		a.setPort(name, nil)
	}
	if len(sps) == 0 {
		delete(a.ports, key)
	} else {
		a.ports[key] = sps
	}
}

// setPort replaces one built ServicePort (nil removes it) and updates the
// resolved ServicePorts its frontends concern.
func (a *Agent) setPort(name model.ServicePortName, sp *model.ServicePort) {
	for _, n := range a.conflicts.Set(name, sp) {
		r, prev := a.conflicts.Resolved(n), a.state.ServicePorts[n]
		if r == nil && prev == nil || r != nil && prev != nil && r.Identical(prev) {
			continue
		}
		a.changed[n] = true
		delete(a.checked, n)
		if prev != nil {
			a.endpoints -= len(prev.ClusterEndpoints)
			a.noLocal.add(prev, -1)
		}
		if r == nil {
			delete(a.state.ServicePorts, n)
			continue
		}
		a.state.ServicePorts[n] = r
		a.endpoints += len(r.ClusterEndpoints)
		a.noLocal.add(r, 1)
		if r.HealthCheckNodePort != 0 {
			a.checked[n] = r
		}
	}
}

// triggerAnnotation is set by the EndpointSlice controller to when the
// change that produced the slice happened.
const triggerAnnotation = corev1.EndpointsLastChangeTriggerTime

// noteTriggers remembers the change trigger times of slices that changed
// since the agent started, to observe the network programming latency when
// they are programmed.
func (a *Agent) noteTriggers(key types.NamespacedName, slices []*discoveryv1.EndpointSlice) {
	seen := map[string]time.Time{}
	old := a.triggers[key]
	for _, s := range slices {
		v, ok := s.Annotations[triggerAnnotation]
		if !ok {
			continue
		}
		t, err := time.Parse(time.RFC3339Nano, v)
		if err != nil {
			continue
		}
		seen[s.Name] = t
		if t.After(a.started) && !t.Equal(old[s.Name]) {
			a.pending = append(a.pending, trigger{at: t, family: model.Family(s.AddressType)})
		}
	}
	if len(seen) == 0 {
		delete(a.triggers, key)
	} else {
		a.triggers[key] = seen
	}
}

// Ignored logs and counts an object (or part of one) left alone on
// purpose; callers report each once. It implements watch.IgnoredSink.
func (a *Agent) Ignored(ig *model.IgnoredError) {
	a.metrics.ignoredObjects.WithLabelValues(ig.Kind).Inc()
	a.log.Info("object ignored", "kind", ig.Kind, "object", ig.Namespace+"/"+ig.Name, "reason", ig.Reason)
}

// invalidKind names the kind of object a model.BuildService error is about.
func invalidKind(err error) string {
	if ie, ok := errors.AsType[*model.InvalidError](err); ok {
		return ie.Kind
	}
	return model.KindService
}
