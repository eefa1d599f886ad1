// Built by tests/cli/test_syscall_supervisor_go.py with Debian's Go, with cgo and without: the
// network side of a Go program under the system-call supervisor. Prints "env <POD_ONLY_VAR>",
// then answers each line on stdin:
//
//	get:URL       "get <status> <body's first line> peer <remote address of the connection>"
//	lookup:NAME   "lookup NAME <addresses, sorted, comma-separated>" (net.LookupHost)
//	hostname      "hostname <os.Hostname()>"
//	dial:ADDR     "dial local <LocalAddr> remote <RemoteAddr>" (TCP)
//	serve:PORT    starts an HTTP server on :PORT answering "go server <path> from <client>",
//	              prints "serving <its port>", and "request <path> from <client>" per request
//	cat:PATH      runs /bin/cat PATH: "cat <output's first line>" (or "cat ! <error>")
//
// Errors are "<command> ! <error>".
package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"os/exec"
	"sort"
	"strings"
	"time"
)

func firstLine(b []byte) string {
	return strings.SplitN(strings.TrimSpace(string(b)), "\n", 2)[0]
}

func get(url string) string {
	peer := "?"
	trace := &httptrace.ClientTrace{GotConn: func(info httptrace.GotConnInfo) {
		peer = info.Conn.RemoteAddr().String()
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(httptrace.WithClientTrace(ctx, trace), "GET", url, nil)
	if err != nil {
		return "get ! " + err.Error()
	}
	resp, err := (&http.Client{Transport: &http.Transport{DisableKeepAlives: true}}).Do(req)
	if err != nil {
		return "get ! " + err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return fmt.Sprintf("get %d %s peer %s", resp.StatusCode, firstLine(body), peer)
}

func lookup(name string) string {
	addrs, err := net.LookupHost(name)
	if err != nil {
		return "lookup ! " + err.Error()
	}
	sort.Strings(addrs)
	return fmt.Sprintf("lookup %s %s", name, strings.Join(addrs, ","))
}

func serve(port string) string {
	ln, err := net.Listen("tcp", ":"+port)
	if err != nil {
		return "serve ! " + err.Error()
	}
	go http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Printf("request %s from %s\n", r.URL.Path, r.RemoteAddr)
		fmt.Fprintf(w, "go server %s from %s\n", r.URL.Path, r.RemoteAddr)
	}))
	return fmt.Sprintf("serving %d", ln.Addr().(*net.TCPAddr).Port)
}

func one(line string) string {
	cmd, arg, _ := strings.Cut(line, ":")
	switch cmd {
	case "get":
		return get(arg)
	case "lookup":
		return lookup(arg)
	case "hostname":
		name, err := os.Hostname()
		if err != nil {
			return "hostname ! " + err.Error()
		}
		return "hostname " + name
	case "dial":
		conn, err := net.DialTimeout("tcp", arg, 30*time.Second)
		if err != nil {
			return "dial ! " + err.Error()
		}
		defer conn.Close()
		return fmt.Sprintf("dial local %s remote %s", conn.LocalAddr(), conn.RemoteAddr())
	case "serve":
		return serve(arg)
	case "cat":
		out, err := exec.Command("/bin/cat", arg).Output()
		if err != nil {
			return "cat ! " + err.Error()
		}
		return "cat " + firstLine(out)
	}
	return "unknown " + line
}

func main() {
	fmt.Printf("env %s\n", os.Getenv("POD_ONLY_VAR"))
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		if line := strings.TrimSpace(in.Text()); line != "" {
			fmt.Println(one(line))
		}
	}
}
