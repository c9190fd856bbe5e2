//go:build linux

package ebpf

import (
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/svcnat/svcnat/pkg/internal/netnstest"
	"github.com/svcnat/svcnat/pkg/model"
)

// TestChurn hammers a Service with connections while its endpoints change:
// no connection may fail, and none may reach an endpoint that was removed
// before the connection started and not added back while it ran.
func TestChurn(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	env := newTestEnv(t)
	b := env.backend(t)
	all := []string{"10.244.1.2", "10.244.1.3", "10.244.1.4", "10.244.1.5", "10.244.1.6"}
	var prefixes []string
	for _, a := range all {
		prefixes = append(prefixes, a+"/24")
	}
	p := newPod(t, prefixes...)
	for _, a := range all {
		p.serveTCP(t, a+":8080")
	}
	web := sp("web", model.IPv4, model.TCP, "10.96.0.10", 80, endpoint(all[0], 8080))
	s := stateOf(web)
	if err := b.Sync(t.Context(), s); err != nil {
		t.Fatal(err)
	}
	env.enterCgroup(t)

	// history[i] is the endpoint set sync i programs; syncs up to completed
	// have returned, sync started may be in progress. A connection may
	// reach any endpoint of the syncs from the last one complete when it
	// started to the last one started when it ended.
	var (
		mu        sync.Mutex
		history   = []map[string]bool{{all[0] + ":8080": true}}
		completed = 0
		started   = 0
	)
	allowed := func(from, to int) map[string]bool {
		mu.Lock()
		defer mu.Unlock()
		ok := map[string]bool{}
		for _, set := range history[from : to+1] {
			for k := range set {
				ok[k] = true
			}
		}
		return ok
	}

	done := make(chan struct{})
	var wg sync.WaitGroup
	var connections, failures int
	var mistakes []string
	const clients = 4
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			deadline := time.Now().Add(20 * time.Second) // bound even if the syncs hang
			for n := 0; n < 5000 && time.Now().Before(deadline); n++ {
				select {
				case <-done:
					return
				default:
				}
				mu.Lock()
				from := completed
				mu.Unlock()
				got, err := dialRead(t, "tcp", "10.96.0.10:80")
				mu.Lock()
				to := started
				mu.Unlock()
				ok := allowed(from, to)
				mu.Lock()
				connections++
				if err != nil {
					failures++
					if len(mistakes) < 10 {
						mistakes = append(mistakes, err.Error())
					}
				} else if !ok[got] && len(mistakes) < 10 {
					mistakes = append(mistakes, "reached removed endpoint "+got)
				}
				mu.Unlock()
			}
		}()
	}

	r := rand.New(rand.NewPCG(1, 2))
	for range 200 {
		var eps []model.Endpoint
		next := map[string]bool{}
		for _, a := range all {
			if r.IntN(2) == 0 {
				eps = append(eps, endpoint(a, 8080))
				next[a+":8080"] = true
			}
		}
		if len(eps) == 0 {
			eps = append(eps, endpoint(all[0], 8080))
			next[all[0]+":8080"] = true
		}
		web.ClusterEndpoints = eps
		mu.Lock()
		history = append(history, next)
		started++
		mu.Unlock()
		if err := b.Sync(t.Context(), s); err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		completed++
		mu.Unlock()
		time.Sleep(2 * time.Millisecond)
	}
	close(done)
	wg.Wait()
	t.Logf("%d connections during 200 endpoint changes, %d failed", connections, failures)
	if connections < 200 {
		t.Errorf("only %d connections: the test did not hammer", connections)
	}
	for _, m := range mistakes {
		t.Error(m)
	}
}
