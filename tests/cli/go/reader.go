// Built by tests/cli/test_syscall_supervisor.py with Debian's Go (cgo off: a static binary
// that makes its system calls itself). Prints the pod's variable, then, for each line on
// stdin (a path), "<path> = <content>" or "<path> ! <error>"; "stat:PATH" prints "<path>
// stat <size> <mode>" from os.Stat; "threads:PATH" reads PATH 25
// times in each of 16 goroutines and prints "goroutines <same content as alone>/<reads>";
// "ls:PATH" prints "<path>: <names>" from os.ReadDir (directories with a trailing /);
// "write:PATH TEXT" writes TEXT and a newline with os.WriteFile and prints "write ok" or
// "write ! <error>".
package main

import (
	"bufio"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
)

func main() {
	fmt.Printf("env %s\n", os.Getenv("POD_ONLY_VAR"))
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		path := strings.TrimSpace(in.Text())
		if strings.HasPrefix(path, "stat:") {
			path = strings.TrimPrefix(path, "stat:")
			info, err := os.Stat(path)
			if err != nil {
				fmt.Printf("%s stat ! %v\n", path, err)
			} else {
				fmt.Printf("%s stat %d %v\n", path, info.Size(), info.Mode())
			}
			continue
		}
		if strings.HasPrefix(path, "ls:") || strings.HasPrefix(path, "write:") {
			fmt.Println(files(path))
			continue
		}
		if strings.HasPrefix(path, "threads:") {
			path = strings.TrimPrefix(path, "threads:")
			first, err := os.ReadFile(path)
			if err != nil {
				fmt.Printf("goroutines ! %v\n", err)
				continue
			}
			var same int64
			var wg sync.WaitGroup
			for g := 0; g < 16; g++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := 0; i < 25; i++ {
						data, err := os.ReadFile(path)
						if err == nil && string(data) == string(first) {
							atomic.AddInt64(&same, 1)
						}
					}
				}()
			}
			wg.Wait()
			fmt.Printf("goroutines %d/%d\n", same, 16*25)
			continue
		}
		data, err := os.ReadFile(path)
		if err != nil {
			fmt.Printf("%s ! %v\n", path, err)
			continue
		}
		fmt.Printf("%s = %s\n", path, strings.TrimSpace(string(data)))
	}
}

func files(line string) string {
	if strings.HasPrefix(line, "write:") {
		path, text, _ := strings.Cut(strings.TrimPrefix(line, "write:"), " ")
		if err := os.WriteFile(path, []byte(text+"\n"), 0o644); err != nil {
			return fmt.Sprintf("write ! %v", err)
		}
		return "write ok"
	}
	path := strings.TrimPrefix(line, "ls:")
	entries, err := os.ReadDir(path)
	if err != nil {
		return fmt.Sprintf("%s ls ! %v", path, err)
	}
	out := path + ":"
	for _, e := range entries {
		out += " " + e.Name()
		if e.IsDir() {
			out += "/"
		}
	}
	return out
}
