//go:build linux

package main

import (
	"fmt"
	"math"
	"path/filepath"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// figure is one plot: a value per proxy and size.
type figure struct {
	file, title, ylabel string
	log                 bool
	// value returns the figure of res and whether there is one.
	value func(res *Result) (float64, bool)
}

var figures = []figure{
	{file: "programming-latency.png", title: "Network programming latency, p50", ylabel: "ms (log scale)", log: true,
		value: func(r *Result) (float64, bool) { return r.LatencyP50Ms, r.measured() && r.LatencyP50Ms > 0 }},
	{file: "connection-overhead.png", title: "New-connection overhead over a direct connection, p50", ylabel: "%",
		value: func(r *Result) (float64, bool) { return r.ConnOverheadPct, r.measured() && r.ConnDirectP50Us > 0 }},
	{file: "memory.png", title: "Agent resident memory at rest", ylabel: "MiB",
		value: func(r *Result) (float64, bool) { return r.RSSSteadyMB, r.measured() && r.RSSSteadyMB > 0 }},
	{file: "initial-programming.png", title: "Initial programming time (capped runs drawn at the cap)", ylabel: "s (log scale)", log: true,
		value: func(r *Result) (float64, bool) { return r.InitSeconds, !r.Failed && r.InitSeconds > 0 }},
}

// writePlots draws every figure into dir and returns the file names.
func writePlots(r *Report, dir string) ([]string, error) {
	var files []string
	for _, f := range figures {
		p := plot.New()
		p.Title.Text = f.title
		p.X.Label.Text = "Services (x 10 endpoints)"
		p.Y.Label.Text = f.ylabel
		if f.log {
			p.Y.Scale = plot.LogScale{}
			p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
		}
		p.Legend.Top = true
		p.Legend.Left = true
		var lines []any
		lo, hi := math.Inf(1), math.Inf(-1)
		for _, kind := range allProxies {
			var pts plotter.XYs
			for _, n := range r.sizes() {
				res := r.find(kind, n)
				if res == nil {
					continue
				}
				if v, ok := f.value(res); ok && (!f.log || v > 0) {
					pts = append(pts, plotter.XY{X: float64(n), Y: v})
					lo, hi = min(lo, v), max(hi, v)
				}
			}
			if len(pts) > 0 {
				lines = append(lines, string(kind), pts)
			}
		}
		if len(lines) == 0 {
			continue
		}
		if err := plotutil.AddLinePoints(p, lines...); err != nil {
			return nil, fmt.Errorf("plot %s: %w", f.file, err)
		}
		if f.log {
			// Log ticks are labelled at powers of ten: show at least two.
			p.Y.Min = math.Pow(10, math.Floor(math.Log10(lo)))
			p.Y.Max = math.Pow(10, max(math.Ceil(math.Log10(hi)), math.Log10(p.Y.Min)+1))
		}
		p.Add(plotter.NewGrid())
		if err := p.Save(7*vg.Inch, 4.5*vg.Inch, filepath.Join(dir, f.file)); err != nil {
			return nil, fmt.Errorf("save plot %s: %w", f.file, err)
		}
		files = append(files, f.file)
	}
	f, err := writePatternPlot(r, dir)
	if f != "" {
		files = append(files, f)
	}
	return files, err
}

// patternPlot is the by-pattern figure: p50 and p99 of every pattern at the
// largest size measured, one series of points per proxy and percentile.
const patternPlot = "latency-by-pattern.png"

func writePatternPlot(r *Report, dir string) (string, error) {
	sizes := r.sizes()
	if len(sizes) == 0 {
		return "", nil
	}
	n := sizes[len(sizes)-1]
	p := plot.New()
	p.Title.Text = fmt.Sprintf("Programming latency by pattern at %d Services: p50 (filled), p99 (open)", n)
	p.Y.Label.Text = "ms (log scale)"
	p.Y.Scale = plot.LogScale{}
	p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
	labels := make([]string, len(patterns))
	for i, pat := range patterns {
		labels[i] = pat.name
	}
	p.NominalX(labels...)
	p.Legend.Top = true
	p.Legend.Left = true
	lo, hi := math.Inf(1), math.Inf(-1)
	drawn := 0
	for k, kind := range allProxies {
		res := r.find(kind, n)
		if res == nil {
			continue
		}
		for _, pct := range []int{50, 99} {
			var pts plotter.XYs
			for i, pat := range patterns {
				pp := res.patternOf(pat.name)
				if pp == nil {
					continue
				}
				v := map[int]float64{50: pp.P50Ms, 99: pp.P99Ms}[pct]
				v = max(v, 0.1) // log scale: a 0 (seen at once) is drawn at 0.1 ms
				// Proxies side by side around each pattern's tick.
				pts = append(pts, plotter.XY{X: float64(i) + 0.12*float64(k) - 0.18, Y: v})
				lo, hi = min(lo, v), max(hi, v)
			}
			if len(pts) == 0 {
				continue
			}
			sc, err := plotter.NewScatter(pts)
			if err != nil {
				return "", fmt.Errorf("plot %s: %w", patternPlot, err)
			}
			sc.Color = plotutil.Color(k)
			sc.Shape = draw.CircleGlyph{}
			if pct == 99 {
				sc.Shape = draw.RingGlyph{}
			}
			sc.Radius = vg.Points(4)
			p.Add(sc)
			if pct == 50 {
				p.Legend.Add(string(kind), sc)
			}
			drawn++
		}
	}
	if drawn == 0 {
		return "", nil
	}
	p.Y.Min = math.Pow(10, math.Floor(math.Log10(lo)))
	p.Y.Max = math.Pow(10, max(math.Ceil(math.Log10(hi)), math.Log10(p.Y.Min)+1))
	p.Add(plotter.NewGrid())
	if err := p.Save(9*vg.Inch, 4.5*vg.Inch, filepath.Join(dir, patternPlot)); err != nil {
		return "", fmt.Errorf("save plot %s: %w", patternPlot, err)
	}
	return patternPlot, nil
}
