from twisted.application.service import ServiceMaker

roller = ServiceMaker("roller", "roller.tap", "The Release Operations Controller", "roller")
