from radai.cli import main

main()
