// Command vunet is a rootless user-mode networking appliance for QEMU virtual
// machines, attached over vhost-user. See docs/cli.md.
package main

import (
	"fmt"
	"os"
)

func main() {
	if err := newApp().Run(os.Args); err != nil {
		fmt.Fprintf(os.Stderr, "vunet: %v\n", err)
		os.Exit(exitCode(err))
	}
}
