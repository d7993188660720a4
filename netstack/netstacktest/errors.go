package netstacktest

import "fmt"

func errorf(format string, args ...any) error { return fmt.Errorf("netstacktest: "+format, args...) }
