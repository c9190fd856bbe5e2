package watch

import (
	"slices"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/svcnat/svcnat/pkg/model"
)

// ignoredRecorder is a recorder that also hears about ignored objects.
type ignoredRecorder struct {
	recorder
	imu     sync.Mutex
	ignored []string
}

func (r *ignoredRecorder) Ignored(ig *model.IgnoredError) {
	r.imu.Lock()
	defer r.imu.Unlock()
	r.ignored = append(r.ignored, ig.Kind+" "+ig.Namespace+"/"+ig.Name)
}

// A slice without the service-name label is reported once when it appears
// and once when a slice loses the label, not on every update.
func TestUnlabelledSliceReportedOnce(t *testing.T) {
	rec := &ignoredRecorder{}
	client, _ := startWith(t, rec)
	ctx := t.Context()
	es := client.DiscoveryV1().EndpointSlices("a")
	if _, err := es.Create(ctx, slice("a", "nolabel", ""), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := es.Create(ctx, slice("a", "web-1", "web"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	rec.waitFor(t, key("a", "web"))
	changed := slice("a", "nolabel", "")
	changed.Endpoints[0].Addresses[0] = "10.244.0.6"
	if _, err := es.Update(ctx, changed, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := es.Update(ctx, slice("a", "web-1", ""), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	rec.waitFor(t, key("a", "web"))
	time.Sleep(100 * time.Millisecond)
	rec.imu.Lock()
	defer rec.imu.Unlock()
	slices.Sort(rec.ignored)
	if want := []string{"EndpointSlice a/nolabel", "EndpointSlice a/web-1"}; !slices.Equal(rec.ignored, want) {
		t.Errorf("ignored reports %v, want %v", rec.ignored, want)
	}
}
