// Command etcd is the etcd server, pinned for the kips end-to-end suite.
// It is upstream's own main (go.etcd.io/etcd/v3/main.go) around etcdmain.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
