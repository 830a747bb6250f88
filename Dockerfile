# syntax=docker/dockerfile:1
# dtrain's container image (k8s/README.md: build, push, run). Two stages: the SDK publishes, the runtime image runs.
# Both are Ubuntu 24.04 ("noble"): its libstdc++ (GCC 14) has GLIBCXX_3.4.32, so TorchSharp's native library loads
# as shipped and build/TorchSharpNativePatch.targets does nothing here (it is needed on Debian 12 only).

FROM mcr.microsoft.com/dotnet/sdk:10.0-noble AS build
WORKDIR /src
# Restore first, from the project files alone: the ~600 MB of TorchSharp and libtorch stay in a cached layer.
COPY Directory.Build.props Directory.Build.targets Directory.Packages.props ./
COPY build/ build/
COPY src/Distributed.Core/Distributed.Core.csproj src/Distributed.Core/
COPY src/Distributed.Comm/Distributed.Comm.csproj src/Distributed.Comm/
COPY src/Distributed.Model/Distributed.Model.csproj src/Distributed.Model/
COPY src/Distributed.Training/Distributed.Training.csproj src/Distributed.Training/
COPY src/Distributed.Cluster/Distributed.Cluster.csproj src/Distributed.Cluster/
COPY src/Distributed.Cli/Distributed.Cli.csproj src/Distributed.Cli/
RUN dotnet restore src/Distributed.Cli/Distributed.Cli.csproj -r linux-x64
COPY src/ src/
COPY cluster-config/ cluster-config/
COPY data/ data/
RUN build/publish /app --no-restore

# ASP.NET Core's runtime image: the data plane and the probes are Kestrel servers.
FROM mcr.microsoft.com/dotnet/aspnet:10.0-noble
WORKDIR /app
COPY --from=build /app ./
# Workstation GC: a pod's few cores go to libtorch (README "Scaling").
ENV DOTNET_gcServer=0 \
    DOTNET_CLI_TELEMETRY_OPTOUT=1
# The non-root user of Microsoft's images; checkpoints go to a mounted volume (/checkpoints in k8s/base).
USER $APP_UID
ENTRYPOINT ["/app/dtrain"]
CMD ["--help"]
