//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/svcnat/svcnat/test/testbed"
)

// The patterns of changes users make, each timed from the write of a
// change until the first new connection through the Service that shows it
// starts.
const (
	patMove        = "move"
	patNewService  = "new-service"
	patBurst       = "burst"
	patRollingNew  = "rolling-new"
	patRollingGone = "rolling-gone"
)

// patterns names them in the order of the report.
var patterns = []struct{ name, label string }{
	{patMove, "move a Service's endpoint, changes 1 s apart"},
	{patNewService, "new Service, then its EndpointSlice"},
	{patBurst, "burst: changes 10 ms apart"},
	{patRollingNew, "rolling update: new pod reached"},
	{patRollingGone, "rolling update: old pod gone"},
}

// burstGap is the time between the changes of a burst.
const burstGap = 10 * time.Millisecond

// rollingFanout is how many attempts the prober starts together on the
// rolling Service, whose new pod is one of three endpoints: with one, it
// was reached about 4 ms after a single endpoint would have been, the odds
// of one connection in three; with four, one tick in five misses it.
const rollingFanout = 4

// Pattern is the programming latency of one pattern, nearest-rank
// percentiles over the changes seen; Timeouts were not seen within the cap.
// Watch is the floor under it: when an informer of the bench's own, beside
// the proxy's, received the writes (deliveries).
type Pattern struct {
	Name       string  `json:"name"`
	Samples    int     `json:"samples"`
	Timeouts   int     `json:"timeouts,omitempty"`
	P50Ms      float64 `json:"p50Ms"`
	P90Ms      float64 `json:"p90Ms"`
	P99Ms      float64 `json:"p99Ms"`
	MaxMs      float64 `json:"maxMs"`
	WatchP50Ms float64 `json:"watchP50Ms,omitempty"`
	WatchP99Ms float64 `json:"watchP99Ms,omitempty"`
}

// timings collects the latencies of one pattern, and the watch's.
type timings struct {
	ms, watch []float64
	timeouts  int
}

func (t *timings) add(d time.Duration) { t.ms = append(t.ms, float64(d)/float64(time.Millisecond)) }

// delivered adds how long after it was sent the bench's informer received
// w, when it did.
func (t *timings) delivered(d *deliveries, w write) {
	if took, ok := d.took(w); ok {
		t.watch = append(t.watch, float64(took)/float64(time.Millisecond))
	}
}

func (t *timings) pattern(name string) Pattern {
	p := Pattern{Name: name, Samples: len(t.ms), Timeouts: t.timeouts}
	if len(t.ms) > 0 {
		p.P50Ms, p.P90Ms, p.P99Ms, p.MaxMs = percentile(t.ms, 50), percentile(t.ms, 90), percentile(t.ms, 99), percentile(t.ms, 100)
	}
	if len(t.watch) > 0 {
		p.WatchP50Ms, p.WatchP99Ms = percentile(t.watch, 50), percentile(t.watch, 99)
	}
	return p
}

// patternOf returns the named pattern of the result, nil when not measured.
func (r *Result) patternOf(name string) *Pattern {
	if !r.measured() {
		return nil
	}
	for i := range r.Patterns {
		if r.Patterns[i].Name == name && r.Patterns[i].Samples > 0 {
			return &r.Patterns[i]
		}
	}
	return nil
}

// during runs write while the prober watches targets, attempts interval
// apart on each, for at most limit. It returns the prober's result per
// target (each with its own error when it did not see its change).
func (b *bench) during(ctx context.Context, limit, interval time.Duration, targets []watchTarget, write func() error) ([]watchResult, error) {
	type answer struct {
		resp proberResponse
		err  error
	}
	ch := make(chan answer, 1)
	go func() {
		r, err := b.prober.do(ctx, proberRequest{Op: "watch", Targets: targets, Timeout: limit, Interval: interval})
		ch <- answer{r, err}
	}()
	werr := write()
	a := <-ch
	if werr != nil {
		return nil, werr
	}
	if len(a.resp.Targets) != len(targets) {
		return nil, fmt.Errorf("watch %d targets: %w", len(targets), a.err)
	}
	return a.resp.Targets, nil
}

// seen returns how long after at the watch's first attempt that saw its
// target's change started.
func seen(r watchResult, at time.Time) (time.Duration, error) {
	if r.OKAt == 0 {
		return 0, errors.New(r.Err)
	}
	return time.Unix(0, r.OKAt).Sub(at), nil
}

// settle waits until the probe Service reaches the pod it points at, so
// that the next change starts from a known endpoint.
func (b *bench) settle(ctx context.Context, p *probeService) error {
	res, err := b.during(ctx, b.p.cap, 20*time.Millisecond, []watchTarget{{Addr: p.addr(), Want: p.pod.Name}}, func() error { return nil })
	if err == nil && res[0].Err != "" {
		err = errors.New(res[0].Err)
	}
	if err != nil {
		return fmt.Errorf("probe %s never reached %s: %w", p.name, p.pod.Name, err)
	}
	return nil
}

// newServices creates a Service, then its EndpointSlice (a real pod), and
// times the slice's creation until the first connection through the
// ClusterIP, b.p.rounds times, 1 s apart; each Service is deleted after.
func (b *bench) newServices(ctx context.Context, tag string) (Pattern, error) {
	var t timings
	for i := range b.p.rounds {
		pod := b.backends[i%len(b.backends)]
		p, err := b.w.createService(ctx, fmt.Sprintf("new-%s-%d", tag, i))
		if err != nil {
			return t.pattern(patNewService), err
		}
		var wr write
		res, err := b.during(ctx, b.p.cap, minInterval, []watchTarget{{Addr: p.addr(), Want: pod.Name}}, func() (err error) {
			wr, err = b.w.createSlice(ctx, p, pod.Endpoint(testbed.Ready))
			return err
		})
		if err == nil {
			t.delivered(b.w.delivered, wr)
			if d, serr := seen(res[0], wr.at); serr != nil {
				t.timeouts++
				b.c.Log.Warn("new service not reached", "service", p.name, "err", serr)
			} else {
				t.add(d)
			}
		}
		if derr := b.w.deleteService(ctx, p); err != nil || derr != nil {
			return t.pattern(patNewService), errors.Join(err, derr)
		}
		if err := sleep(ctx, time.Second); err != nil {
			return t.pattern(patNewService), err
		}
	}
	return t.pattern(patNewService), nil
}

// bursts moves every probe Service to its other pod, one change burstGap
// after the other, and times each change; b.p.burstRounds times, 1 s apart.
// Each target is tried every 5 ms (not 2 ms as single changes), to keep
// the prober's own load bounded.
func (b *bench) bursts(ctx context.Context) (Pattern, error) {
	var t timings
	for range b.p.burstRounds {
		targets := make([]watchTarget, len(b.probes))
		to := make([]*testbed.Pod, len(b.probes))
		at := make([]write, len(b.probes))
		for i, p := range b.probes {
			to[i] = b.other(p)
			targets[i] = watchTarget{Addr: p.addr(), Want: to[i].Name}
		}
		res, err := b.during(ctx, b.p.cap, 5*time.Millisecond, targets, func() error {
			start := time.Now()
			for i, p := range b.probes {
				if err := sleep(ctx, time.Until(start.Add(time.Duration(i)*burstGap))); err != nil {
					return err
				}
				var err error
				if at[i], err = b.w.point(ctx, p, to[i]); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return t.pattern(patBurst), err
		}
		for i, r := range res {
			t.delivered(b.w.delivered, at[i])
			d, err := seen(r, at[i].at)
			if err == nil {
				t.add(d)
				continue
			}
			t.timeouts++
			b.c.Log.Warn("burst change not seen", "probe", b.probes[i].name, "err", err)
			if err := b.settle(ctx, b.probes[i]); err != nil {
				return t.pattern(patBurst), err
			}
		}
		if err := sleep(ctx, time.Second); err != nil {
			return t.pattern(patBurst), err
		}
	}
	return t.pattern(patBurst), nil
}

// rolling replaces the rolling Service's pods one by one, b.p.rounds steps
// 1 s apart, and times each new pod until it is reached and each old pod
// until it no longer is.
func (b *bench) rolling(ctx context.Context) (added, gone Pattern, err error) {
	var ta, tg timings
	r := b.roll
	for range b.p.rounds {
		// The pods the step will use, for the watch that starts first.
		newPod, oldPod := r.upcoming()
		var added, old write
		res, err := b.during(ctx, b.p.cap, minInterval, []watchTarget{{Addr: r.addr(), Want: newPod.Name, Gone: oldPod.Name, Fanout: rollingFanout}}, func() (err error) {
			added, old, err = b.w.step(ctx, r)
			return err
		})
		if err != nil {
			return ta.pattern(patRollingNew), tg.pattern(patRollingGone), err
		}
		ta.delivered(b.w.delivered, added)
		tg.delivered(b.w.delivered, old)
		w := res[0]
		if d, err := seen(w, added.at); err != nil {
			ta.timeouts++
		} else {
			ta.add(d)
		}
		if w.Err != "" || w.GoneAt == 0 {
			tg.timeouts++
			b.c.Log.Warn("rolling update step not seen", "new", newPod.Name, "old", oldPod.Name, "err", w.Err)
		} else {
			tg.add(max(0, time.Unix(0, w.GoneAt).Sub(old.at)))
		}
		if err := sleep(ctx, time.Second); err != nil {
			return ta.pattern(patRollingNew), tg.pattern(patRollingGone), err
		}
	}
	return ta.pattern(patRollingNew), tg.pattern(patRollingGone), nil
}
