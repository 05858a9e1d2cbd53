from raybatch.server.main import main

main()
