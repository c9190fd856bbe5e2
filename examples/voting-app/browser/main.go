// Command browser checks the voting app in a real browser, headless
// Chromium driven over the DevTools protocol (chromedp): it loads the vote
// page, clicks an option, then loads the result page until it shows at
// least the expected number of votes, and saves a screenshot of each page.
// It prints what the pages showed as one JSON line.
//
// Chromium runs in the network namespace of this process: run it inside
// the one that should reach the pages (the test bed's external client).
//
//	browser -vote URL -result URL -choice a|b -want-total N -out DIR
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/chromedp/chromedp"
)

// Report is what the pages showed; printed as JSON.
type Report struct {
	Voted string `json:"voted"` // the vote page's confirmation
	A     int    `json:"a"`     // the result page's counts
	B     int    `json:"b"`
	Total int    `json:"total"`
}

func main() {
	var (
		vote     = flag.String("vote", "", "URL of the vote page")
		result   = flag.String("result", "", "URL of the result page")
		choice   = flag.String("choice", "a", "option to click: a or b")
		want     = flag.Int("want-total", 1, "wait until the result page shows at least this many votes")
		out      = flag.String("out", ".", "directory for vote.png and result.png")
		chromium = flag.String("chromium", "/usr/bin/chromium", "Chromium binary")
		timeout  = flag.Duration("timeout", time.Minute, "limit for the whole check")
	)
	flag.Parse()
	if *vote == "" || *result == "" || (*choice != "a" && *choice != "b") {
		fmt.Fprintln(os.Stderr, "browser: need -vote URL, -result URL and -choice a|b")
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	r, err := check(ctx, *chromium, *vote, *result, *choice, *want, *out)
	if err != nil {
		fmt.Fprintln(os.Stderr, "browser:", err)
		os.Exit(1)
	}
	_ = json.NewEncoder(os.Stdout).Encode(r)
}

func check(ctx context.Context, chromium, voteURL, resultURL, choice string, want int, out string) (Report, error) {
	var r Report
	// Everything Chromium writes goes below one directory, removed at the
	// end: its profile, and via HOME, XDG_* and TMPDIR its crash reports and
	// singleton socket, which it would otherwise leave in ~/.config and /tmp.
	home, err := os.MkdirTemp("", "voting-browser-")
	if err != nil {
		return r, fmt.Errorf("make chromium home directory: %w", err)
	}
	defer os.RemoveAll(home)
	tmp, profile := filepath.Join(home, "tmp"), filepath.Join(home, "profile")
	if err := os.Mkdir(tmp, 0o700); err != nil {
		return r, fmt.Errorf("make chromium temporary directory: %w", err)
	}
	actx, cancel := chromedp.NewExecAllocator(ctx,
		chromedp.ExecPath(chromium),
		chromedp.Flag("headless", true),
		chromedp.Flag("no-sandbox", true),
		chromedp.Flag("disable-gpu", true),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("no-first-run", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.UserDataDir(profile),
		chromedp.Env("HOME="+home, "TMPDIR="+tmp, "XDG_CONFIG_HOME="+filepath.Join(home, "config"),
			"XDG_CACHE_HOME="+filepath.Join(home, "cache")),
		chromedp.WindowSize(900, 640),
	)
	defer cancel()
	bctx, cancel := chromedp.NewContext(actx)
	defer cancel()

	if err := chromedp.Do(bctx,
		chromedp.Navigate(voteURL),
		chromedp.Click(chromedp.ID(choice)),
		chromedp.WaitVisible(chromedp.ID("voted")),
	); err != nil {
		return r, fmt.Errorf("vote for %s on %s: %w", choice, voteURL, err)
	}
	if r.Voted, err = chromedp.Run(bctx, chromedp.Text(chromedp.ID("voted"))); err != nil {
		return r, fmt.Errorf("read vote confirmation on %s: %w", voteURL, err)
	}
	if err := screenshot(bctx, out, "vote.png"); err != nil {
		return r, err
	}
	// The worker moves the vote to postgres asynchronously: reload until
	// it shows.
	for {
		if err := chromedp.Do(bctx, chromedp.Navigate(resultURL)); err != nil {
			return r, fmt.Errorf("load result page %s: %w", resultURL, err)
		}
		for _, f := range []struct {
			id string
			n  *int
		}{{"count-a", &r.A}, {"count-b", &r.B}, {"total", &r.Total}} {
			text, err := chromedp.Run(bctx, chromedp.Text(chromedp.ID(f.id)))
			if err != nil {
				return r, fmt.Errorf("read #%s on %s: %w", f.id, resultURL, err)
			}
			// "#total" reads "N votes".
			if *f.n, err = strconv.Atoi(strings.Fields(text + " ")[0]); err != nil {
				return r, fmt.Errorf("read #%s on %s: %q is not a count", f.id, resultURL, text)
			}
		}
		if r.Total >= want {
			return r, screenshot(bctx, out, "result.png")
		}
		select {
		case <-ctx.Done():
			return r, fmt.Errorf("result page %s shows %d votes, want %d: %w", resultURL, r.Total, want, ctx.Err())
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// screenshot saves the viewport as dir/name (PNG).
func screenshot(ctx context.Context, dir, name string) error {
	png, err := chromedp.Run(ctx, chromedp.CaptureScreenshot())
	if err != nil {
		return fmt.Errorf("screenshot %s: %w", name, err)
	}
	if err := os.WriteFile(filepath.Join(dir, name), png, 0o644); err != nil {
		return fmt.Errorf("save screenshot: %w", err)
	}
	return nil
}
