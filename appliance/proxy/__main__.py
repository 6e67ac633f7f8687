import sys

from appliance.proxy.service import static_main

sys.exit(static_main())
