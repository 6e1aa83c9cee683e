# twistd -ny roller.tac: the same service as `twistd roller`, configured by
# $ROLLER_CONFIG and ROLLER_* environment variables.
from twisted.application.service import Application

from roller.tap import Options, makeService

options = Options()
options.parseOptions([])
application = Application("roller")
makeService(options).setServiceParent(application)
