package watch

import (
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/svcnat/svcnat/pkg/model"
	"github.com/svcnat/svcnat/pkg/model/modeltest"
)

// TestTrimKeepsWhatModelReads builds every pkg/model fixture (every
// frontend kind, traffic policy, condition, hint and invalid input the
// model handles) from the objects as given and as trim caches them: the
// States and errors must be equal, so trim drops nothing the model reads.
func TestTrimKeepsWhatModelReads(t *testing.T) {
	files, err := modeltest.Files()
	if err != nil || len(files) == 0 {
		t.Fatalf("no fixtures: %v", err)
	}
	for _, file := range files {
		t.Run(strings.TrimSuffix(filepath.Base(file), ".yaml"), func(t *testing.T) {
			data, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			f, err := modeltest.Parse(data)
			if err != nil {
				t.Fatal(err)
			}
			cfg := &model.Config{}
			if err := f.DecodeConfig(cfg); err != nil {
				t.Fatal(err)
			}
			var svcs []*corev1.Service
			var eps []*discoveryv1.EndpointSlice
			for _, s := range f.Services {
				svcs = append(svcs, trimmed(t, s.DeepCopy()))
			}
			for _, s := range f.Slices {
				eps = append(eps, trimmed(t, s.DeepCopy()))
			}
			want, wantErrs := model.Build(cfg, f.Services, f.Slices)
			got, gotErrs := model.Build(cfg, svcs, eps)
			if d := model.Diff(want, got); len(d) > 0 {
				t.Errorf("state built from trimmed objects differs:\n%s", strings.Join(d, "\n"))
			}
			for _, s := range want.ServicePorts {
				if g := got.ServicePorts[s.Name]; g == nil || !s.Identical(g) {
					t.Errorf("service port %s from trimmed objects = %+v, want %+v", s.Name, g, s)
				}
			}
			if d := cmp.Diff(fmt.Sprint(wantErrs), fmt.Sprint(gotErrs)); d != "" {
				t.Errorf("errors from trimmed objects differ (-want +got):\n%s", d)
			}
		})
	}
}

func trimmed[T any](t *testing.T, obj T) T {
	t.Helper()
	out, err := trim(obj)
	if err != nil {
		t.Fatal(err)
	}
	return out.(T)
}

// TestTrimKeepsOnlyWhatIsRead fills every field of a Service and an
// EndpointSlice (the labels and annotation svcnat reads among others), and
// checks that trim keeps exactly the fields its doc comment lists, each of
// which has a reader: a field the API adds, or one svcnat stops reading,
// makes it fail. Trimming is idempotent, as client-go asks.
func TestTrimKeepsOnlyWhatIsRead(t *testing.T) {
	meta := []string{"ObjectMeta.Name", "ObjectMeta.Namespace", "ObjectMeta.ResourceVersion"}
	for _, c := range []struct {
		obj  any
		want []string
	}{
		{&corev1.Service{}, append([]string{
			"ObjectMeta.UID",
			"Spec.ClusterIP", "Spec.ClusterIPs[]", "Spec.ExternalIPs[]", "Spec.ExternalTrafficPolicy",
			"Spec.HealthCheckNodePort", "Spec.InternalTrafficPolicy", "Spec.LoadBalancerSourceRanges[]",
			"Spec.Ports[].Name", "Spec.Ports[].NodePort", "Spec.Ports[].Port", "Spec.Ports[].Protocol",
			"Spec.SessionAffinity", "Spec.SessionAffinityConfig.ClientIP.TimeoutSeconds", "Spec.Type",
			"Status.LoadBalancer.Ingress[].IP", "Status.LoadBalancer.Ingress[].IPMode",
		}, meta...)},
		{&discoveryv1.EndpointSlice{}, append([]string{
			"AddressType",
			"Endpoints[].Addresses[]", "Endpoints[].Conditions.Ready", "Endpoints[].Conditions.Serving",
			"Endpoints[].Conditions.Terminating", "Endpoints[].Hints.ForNodes[].Name", "Endpoints[].Hints.ForZones[].Name",
			"Endpoints[].NodeName",
			"ObjectMeta.Annotations[" + corev1.EndpointsLastChangeTriggerTime + "]",
			"ObjectMeta.Labels[" + discoveryv1.LabelServiceName + "]",
			"Ports[].Name", "Ports[].Port", "Ports[].Protocol",
		}, meta...)},
	} {
		v := reflect.ValueOf(c.obj).Elem()
		fill(v, 0)
		m := v.FieldByName("ObjectMeta")
		m.FieldByName("Labels").SetMapIndex(reflect.ValueOf(discoveryv1.LabelServiceName), reflect.ValueOf("x"))
		m.FieldByName("Annotations").SetMapIndex(reflect.ValueOf(corev1.EndpointsLastChangeTriggerTime), reflect.ValueOf("x"))
		out, err := trim(c.obj)
		if err != nil {
			t.Fatal(err)
		}
		// The informer may pass a cached object to trim again.
		if again, _ := trim(out); !reflect.DeepEqual(again, out) {
			t.Errorf("%T: trimming twice = %+v, want %+v", c.obj, again, out)
		}
		var got []string
		leaves(reflect.ValueOf(out).Elem(), "", &got)
		slices.Sort(got)
		got = slices.Compact(got)
		slices.Sort(c.want)
		if d := cmp.Diff(c.want, got); d != "" {
			t.Errorf("%T: fields kept (-want +got):\n%s", c.obj, d)
		}
	}
}

// fill sets every exported field reachable from v to a non-zero value.
func fill(v reflect.Value, depth int) {
	if depth > 12 {
		return
	}
	switch v.Kind() {
	case reflect.Pointer:
		v.Set(reflect.New(v.Type().Elem()))
		fill(v.Elem(), depth+1)
	case reflect.Struct:
		for i := range v.NumField() {
			if v.Type().Field(i).IsExported() {
				fill(v.Field(i), depth+1)
			}
		}
	case reflect.Slice:
		v.Set(reflect.MakeSlice(v.Type(), 1, 1))
		fill(v.Index(0), depth+1)
	case reflect.Map:
		k, e := reflect.New(v.Type().Key()).Elem(), reflect.New(v.Type().Elem()).Elem()
		fill(k, depth+1)
		fill(e, depth+1)
		v.Set(reflect.MakeMap(v.Type()))
		v.SetMapIndex(k, e)
	case reflect.String:
		v.SetString("x")
	case reflect.Bool:
		v.SetBool(true)
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		v.SetInt(1)
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		v.SetUint(1)
	case reflect.Float32, reflect.Float64:
		v.SetFloat(1)
	}
}

// leaves appends the paths of the non-zero values reachable from v:
// fields by name, slice elements as [], map entries as [key].
func leaves(v reflect.Value, path string, out *[]string) {
	switch v.Kind() {
	case reflect.Pointer, reflect.Interface:
		if !v.IsNil() {
			leaves(v.Elem(), path, out)
		}
	case reflect.Struct:
		for i := range v.NumField() {
			if f := v.Type().Field(i); f.IsExported() {
				leaves(v.Field(i), strings.TrimPrefix(path+"."+f.Name, "."), out)
			}
		}
	case reflect.Slice:
		for i := range v.Len() {
			leaves(v.Index(i), path+"[]", out)
		}
	case reflect.Map:
		for _, k := range v.MapKeys() {
			leaves(v.MapIndex(k), fmt.Sprintf("%s[%v]", path, k), out)
		}
	default:
		if !v.IsZero() {
			*out = append(*out, path)
		}
	}
}

// TestInterner checks that equal strings share one copy, and that the
// interner stays bounded while names keep coming.
func TestInterner(t *testing.T) {
	in := &interner{strs: map[string]*string{}}
	a, b := "node-1", strings.Clone("node-1")
	if pa, pb := in.ptr(&a), in.ptr(&b); pa != pb || *pa != "node-1" {
		t.Errorf("ptr(node-1) twice = %p, %p; want one pointer to node-1", pa, pb)
	}
	if in.ptr(nil) != nil {
		t.Error("ptr(nil) is not nil")
	}
	for i := range maxInterned + 10 {
		if s := fmt.Sprint(i); in.str(s) != s {
			t.Fatalf("str(%q) = %q", s, in.str(s))
		}
	}
	if len(in.strs) > maxInterned {
		t.Errorf("interner holds %d strings, want at most %d", len(in.strs), maxInterned)
	}
}
