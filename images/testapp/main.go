// Command testapp is the workload of kips' node tests: one static binary, two roles.
//
//	testapp serve [ARGS...]   HTTP on $LISTEN (default :8080). GET / answers
//	                          "$ANSWER <hostname>" (ANSWER defaults to "cluster"; a pod's
//	                          hostname is its name), /healthz answers "ok", /args the
//	                          arguments it was started with, one per line. ARGS are otherwise
//	                          ignored, so the same binary stands in for a sidecar whose
//	                          arguments are meant for another program. Every request is logged
//	                          with its source address, which tells who reached which container.
//	                          With $UDP_LISTEN set it also answers every UDP datagram there
//	                          with "$ANSWER <hostname>".
//	testapp get URL           GET URL and print the body; exit 1 on an error or a non-2xx.
//	testapp echo ADDR         TCP echo server on ADDR: every connection gets its bytes back.
//	testapp udp ADDR MESSAGE  send MESSAGE in one UDP datagram to ADDR and print the answer;
//	                          exit 1 when none comes within 3 s.
//	testapp timed-get URL     GET URL (a new connection, 5 s limit) and print one line:
//	                          "<ms> ms ok <status> <body>" or "<ms> ms error <error>"; exit 0
//	                          either way (the time is what it is for).
package main

import (
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

func main() {
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	if len(os.Args) < 2 {
		usage()
	}
	switch os.Args[1] {
	case "serve":
		serve(os.Args[2:])
	case "get":
		if len(os.Args) != 3 {
			usage()
		}
		os.Exit(get(os.Args[2]))
	case "echo":
		if len(os.Args) != 3 {
			usage()
		}
		echo(os.Args[2])
	case "udp":
		if len(os.Args) != 4 {
			usage()
		}
		os.Exit(udp(os.Args[2], os.Args[3]))
	case "timed-get":
		if len(os.Args) != 3 {
			usage()
		}
		timedGet(os.Args[2])
	default:
		usage()
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: testapp serve [ARGS...] | testapp get URL | testapp timed-get URL | testapp echo ADDR | testapp udp ADDR MESSAGE")
	os.Exit(2)
}

func env(name, fallback string) string {
	if v, ok := os.LookupEnv(name); ok && v != "" {
		return v
	}
	return fallback
}

func serve(args []string) {
	listen := env("LISTEN", ":8080")
	answer := env("ANSWER", "cluster")
	host, err := os.Hostname()
	if err != nil {
		log.Fatalf("hostname: %v", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s %s\n", answer, host)
	})
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/args", func(w http.ResponseWriter, r *http.Request) {
		for _, a := range args {
			fmt.Fprintln(w, a)
		}
	})
	logged := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		log.Printf("%s %s from %s", r.Method, r.URL.Path, r.RemoteAddr)
		mux.ServeHTTP(w, r)
	})
	server := &http.Server{Addr: listen, Handler: logged, ReadHeaderTimeout: 5 * time.Second}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-stop
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = server.Shutdown(ctx)
	}()
	if udpListen := env("UDP_LISTEN", ""); udpListen != "" {
		go udpServe(udpListen, answer+" "+host+"\n")
	}
	log.Printf("answering %q on %s (args: %s)", answer, listen, strings.Join(args, " "))
	if err := server.ListenAndServe(); err != nil && err != http.ErrServerClosed {
		log.Fatal(err)
	}
}

func get(url string) int {
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	os.Stdout.Write(body)
	if resp.StatusCode/100 != 2 {
		fmt.Fprintf(os.Stderr, "%s: %s\n", url, resp.Status)
		return 1
	}
	return 0
}

func udpServe(addr, answer string) {
	conn, err := net.ListenPacket("udp", addr)
	if err != nil {
		log.Fatalf("udp %s: %v", addr, err)
	}
	log.Printf("answering %q on udp %s", strings.TrimSpace(answer), addr)
	buf := make([]byte, 65536)
	for {
		n, from, err := conn.ReadFrom(buf)
		if err != nil {
			log.Fatalf("udp %s: %v", addr, err)
		}
		log.Printf("udp %d bytes from %s", n, from)
		_, _ = conn.WriteTo([]byte(answer), from)
	}
}

func echo(addr string) {
	listener, err := net.Listen("tcp", addr)
	if err != nil {
		log.Fatalf("echo %s: %v", addr, err)
	}
	log.Printf("echoing on %s", addr)
	for {
		conn, err := listener.Accept()
		if err != nil {
			log.Fatalf("echo %s: %v", addr, err)
		}
		log.Printf("echo connection from %s", conn.RemoteAddr())
		go func() {
			defer conn.Close()
			_, _ = io.Copy(conn, conn)
		}()
	}
}

func udp(addr, message string) int {
	conn, err := net.Dial("udp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer conn.Close()
	if _, err := conn.Write([]byte(message)); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	_ = conn.SetReadDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, 65536)
	n, err := conn.Read(buf)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	os.Stdout.Write(buf[:n])
	return 0
}

func timedGet(url string) {
	client := &http.Client{
		Timeout:   5 * time.Second,
		Transport: &http.Transport{DisableKeepAlives: true},
	}
	start := time.Now()
	resp, err := client.Get(url)
	var body []byte
	if err == nil {
		body, err = io.ReadAll(resp.Body)
		resp.Body.Close()
	}
	ms := time.Since(start).Milliseconds()
	if err != nil {
		fmt.Printf("%d ms error %v\n", ms, err)
		return
	}
	fmt.Printf("%d ms ok %d %s\n", ms, resp.StatusCode, strings.TrimSpace(string(body)))
}
